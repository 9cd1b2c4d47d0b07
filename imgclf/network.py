"""Fetching things from the network: a few quick retries for transient errors, then one clear
error that names what could not be fetched and how to work offline."""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from .errors import DataError
from .progress import Progress

T = TypeVar("T")
RETRY_DELAYS = (1.0, 3.0)  # seconds before the 2nd and 3rd attempt
TIMEOUT = 30.0


class NetworkError(DataError):
    """Something could not be fetched; the message says what, why, and the offline way."""


def transient(err: BaseException) -> bool:
    """Errors worth another try: connection trouble, time-outs, HTTP 5xx and 429."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    try:
        import requests

        if isinstance(err, requests.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow and tfds
        pass
    return isinstance(err, (OSError, socket.timeout, ConnectionError, TimeoutError))


def short_reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def with_retries(fetch: Callable[[], T], what: str, offline: str,
                 delays: tuple[float, ...] = RETRY_DELAYS, tried_before: int = 0) -> T:
    """``fetch()``, retried after each of ``delays`` on a transient error; then NetworkError.
    ``tried_before``: failed attempts the caller already made (counted in the message)."""
    for attempt in range(len(delays) + 1):
        try:
            return fetch()
        except Exception as err:  # noqa: BLE001 - filtered by transient()
            if not transient(err):
                raise
            if attempt == len(delays):
                tries = tried_before + attempt + 1
                raise NetworkError(f"cannot fetch {what} ({short_reason(err)}; tried {tries} times). "
                                   f"{offline}") from None
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def check_reachable(url: str, what: str, offline: str, timeout: float = 5.0,
                    delays: tuple[float, ...] = RETRY_DELAYS) -> None:
    """Resolve and connect to ``url``'s host (no request), so an offline machine fails in
    seconds rather than after a library's own long retry loop."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)

    def connect() -> None:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass

    with_retries(connect, f"{what} from {url}", offline, delays)


def cache_dir() -> Path:
    """Where downloaded archives are kept: ``$IMGCLF_CACHE`` or ``~/.cache/imgclf``."""
    return Path(os.environ.get("IMGCLF_CACHE") or Path.home() / ".cache" / "imgclf")


def cached_download(url: str, sha256: str, offline: str, delays: tuple[float, ...] = RETRY_DELAYS) -> Path:
    """The file at ``url``, downloaded once and kept under :func:`cache_dir` by URL (and by
    ``sha256`` when given), with a progress bar on stderr. A kept file whose checksum does not
    match is fetched again; a partial download never lands in the cache."""
    key = hashlib.sha256(f"{url}\n{sha256.lower()}".encode()).hexdigest()[:20]
    name = Path(urllib.parse.urlsplit(url).path).name or "download"
    target = cache_dir() / "downloads" / key / name
    if target.is_file() and (not sha256 or sha256_file(target) == sha256.lower()):
        print(f"using the archive downloaded before: {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.{os.getpid()}.part")

    def fetch() -> None:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            progress = Progress(total, sys.stderr, unit="MB", scale=2**20) if total else None
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                if progress:
                    progress.update(len(chunk))

    try:
        with_retries(fetch, f"the archive {url}", offline, delays)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
