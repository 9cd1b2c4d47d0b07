"""``python -m imgclf.review``: a local page to review the audit's suspects with the keyboard.

It serves the current workspace's audit (``reports/audit/suspects.json`` and
``cross_split_copies.csv``) on 127.0.0.1 and writes each decision at once: exclude and relabel as
rows of the corrections file (``split.corrections``), "the label is right" in ``reviewed.csv``
beside it (:mod:`imgclf.data.review`). Then ``git commit`` and ``dvc exp run`` rerun the pipeline
from the split stage. Only the photos the audit lists (and their neighbours) are served, by number;
a POST must carry the token of this start, which only this page knows.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import console
from .data.review import DECISIONS, Decision, Decisions
from .errors import StageError
from .params import load_params
from .project import Layout, project_root, user_cache

DEFAULT_PORT = 5055
PAGE_LIMIT = 500  # suspects per answer: the page asks for more as you move on
SIZES = {"thumb": 192, "large": 640}  # longest side in pixels
TOKEN_HEADER = "X-Review-Token"


@dataclass
class Audit:
    """What the audit stage wrote, with every photo it names numbered for the page."""

    classes: list[str]
    suspects: list[dict]
    copies: list[dict]
    photos: list[str]  # paths under data/raw, by number
    number: dict[str, int]


def load_audit(layout: Layout) -> Audit:
    reports = layout.reports("audit")
    suspects_file = reports / "suspects.json"
    if not suspects_file.is_file():
        raise StageError(f"no audit outputs in {reports.relative_to(layout.root)}: run `dvc repro audit` first")
    found = json.loads(suspects_file.read_text())
    copies = []
    copies_file = reports / "cross_split_copies.csv"
    if copies_file.is_file():
        with copies_file.open(newline="") as fh:
            copies = list(csv.DictReader(fh))
    photos, number = [], {}
    for path in ([p for s in found["suspects"] for p in (s["path"], *s["like_given"], *s["like_suggested"])]
                 + [p for c in copies for p in (c["path_a"], c["path_b"])]):
        if path not in number:
            number[path] = len(photos)
            photos.append(path)
    return Audit(list(found["classes"]), found["suspects"], copies, photos, number)


def thumbnail(source: Path, size: int, cache: Path) -> Path | None:
    """``source`` as a JPEG at most ``size`` pixels on its longest side, made once and kept in
    ``cache`` (named by the file's path, size and modification time); None if it cannot be read."""
    from PIL import Image, ImageOps

    try:
        stat = source.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{size}".encode()).hexdigest()
    target = cache / f"{key}.jpg"
    if target.is_file():
        return target
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                image.save(fh, "JPEG", quality=88)
            os.replace(tmp, target)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return target


def create_app(layout: Layout, audit: Audit, decisions: Decisions, token: str):
    """The page and its small JSON API (Flask)."""
    from flask import Flask, abort, jsonify, request, send_file

    app = Flask(__name__)
    page = (Path(__file__).with_name("review.html").read_text()
            .replace("__TOKEN__", token).replace("__CLASSES__", json.dumps(audit.classes)))
    cache = user_cache("review")
    index = {s["path"]: i for i, s in enumerate(audit.suspects)}

    def photo(path: str) -> dict:
        return {"id": audit.number[path], "path": path}

    def described(suspect: dict, decided: dict[str, Decision]) -> dict:
        decision = decided.get(suspect["path"])
        return {**suspect, "image": audit.number[suspect["path"]],
                "like_given": [photo(p) for p in suspect["like_given"]],
                "like_suggested": [photo(p) for p in suspect["like_suggested"]],
                "decision": None if decision is None else {"action": decision.action, "label": decision.label}}

    def reviewed(decided: dict[str, Decision]) -> int:
        return sum(1 for s in audit.suspects if s["path"] in decided)

    @app.get("/")
    def home():
        return page, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}

    @app.get("/api/suspects")
    def suspects():
        given, suggested, split = (request.args.get(k, "") for k in ("given", "suggested", "split"))
        chosen = [s for s in audit.suspects if (not given or s["given"] == given)
                  and (not suggested or s["suggested"] == suggested) and (not split or s["split"] == split)]
        offset = max(request.args.get("offset", 0, type=int), 0)
        limit = min(max(request.args.get("limit", 100, type=int), 1), PAGE_LIMIT)
        decided = decisions.current()
        return jsonify(total=len(chosen), offset=offset, reviewed=reviewed(decided), all=len(audit.suspects),
                       items=[described(s, decided) for s in chosen[offset:offset + limit]])

    @app.get("/api/copies")
    def copies():
        offset = max(request.args.get("offset", 0, type=int), 0)
        limit = min(max(request.args.get("limit", 100, type=int), 1), PAGE_LIMIT)
        return jsonify(total=len(audit.copies), offset=offset, items=[
            {**c, "a": audit.number[c["path_a"]], "b": audit.number[c["path_b"]]}
            for c in audit.copies[offset:offset + limit]])

    @app.get("/image/<int:number>/<size>")
    def image(number: int, size: str):
        if size not in SIZES or not 0 <= number < len(audit.photos):
            abort(404)
        found = thumbnail(layout.raw / audit.photos[number], SIZES[size], cache)
        if found is None:
            abort(404)  # deleted since the audit: the page shows it as missing, still decidable
        return send_file(found, mimetype="image/jpeg", max_age=3600)

    def checked_body() -> dict:
        if not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            abort(403)
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400)
        return body

    @app.post("/api/decide")
    def decide():
        body = checked_body()
        path, action, label = (str(body.get(k, "")) for k in ("path", "action", "label"))
        if path not in index or action not in DECISIONS:
            abort(400)
        suspect = audit.suspects[index[path]]
        if action == "relabel" and label not in audit.classes:
            abort(400)
        if action == "relabel" and label == suspect["given"]:
            action, label = "keep", ""  # "relabel" to the label it has: the label is right
        decisions.decide(path, Decision(action, label))
        decided = decisions.current()
        return jsonify(path=path, decision=described(suspect, decided)["decision"], reviewed=reviewed(decided))

    @app.post("/api/undo")
    def undo():
        checked_body()
        path = decisions.undo()
        decided = decisions.current()
        restored = described(audit.suspects[index[path]], decided)["decision"] if path in index else None
        return jsonify(path=path, decision=restored, reviewed=reviewed(decided))

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (werkzeug, asked to bind itself, exits the process on a
    port in use instead of raising)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within a minute: TIME_WAIT is no user
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgclf.review", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    args = parser.parse_args(argv)
    layout = Layout(project_root())
    try:
        params = load_params(layout.params_file)
        audit = load_audit(layout)
        decisions = Decisions(layout.root / params.split.corrections, params.data.set_name)
    except StageError as err:  # bad params, no audit, a malformed corrections file
        print(f"error: {err}", file=sys.stderr)
        return 1
    from werkzeug.serving import make_server

    if not console.verbose():  # one line per request otherwise
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    token = secrets.token_urlsafe(24)
    try:
        listening = listen(args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}): "
              "pass another port with --port", file=sys.stderr)
        return 1
    server = make_server(args.host, args.port, create_app(layout, audit, decisions, token), threaded=True,
                         fd=listening.fileno())
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"reviewing {len(audit.suspects):,} suspects of {layout.root.name} at http://{host}:{server.port}/ "
          f"(decisions go to {decisions.corrections.name} and {decisions.memory.name}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
