"""A one-line progress bar on stderr (predict's images, downloads' megabytes)."""
from __future__ import annotations

from typing import TextIO


class Progress:
    """``[#####.....] 12/40 images``, redrawn in place; a newline once done."""

    def __init__(self, total: int, stream: TextIO, width: int = 30, unit: str = "images", scale: float = 1):
        self.total, self.stream, self.width, self.done = total, stream, width, 0
        self.unit, self.scale = unit, scale

    def update(self, count: int) -> None:
        self.done += count
        filled = int(self.width * self.done / max(self.total, 1))
        shown = (f"{self.done / self.scale:.1f}/{self.total / self.scale:.1f}" if self.scale != 1
                 else f"{self.done}/{self.total}")
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {shown} {self.unit}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
