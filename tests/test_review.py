"""The review page's decisions (rows of corrections.csv, a memory of photos judged right, undo),
its API (per-start token, only the audit's photos served, by number) and the command's one-line
errors. The page itself in a real browser: tests/test_review_browser.py."""
import csv
import json
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, make_folder, tiny_params
from imgclf.data.corrections import read_corrections
from imgclf.data.review import Decision, Decisions
from imgclf.project import Layout
from imgclf.review import Audit, create_app, load_audit

HEADER = "path,action,label\n"


def rows(path):
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def test_decisions_replace_one_row_per_photo_keep_the_others_in_order_and_undo(tmp_path):
    file = tmp_path / "corrections.csv"
    file.write_text(HEADER + "a/1.jpg,exclude,\nb/2.jpg,relabel,a\n")
    decisions = Decisions(file, "photos")
    assert rows(tmp_path / "reviewed.csv") == [["path", "data"]]  # the memory file exists from the start
    decisions.decide("c/3.jpg", Decision("exclude"))
    decisions.decide("b/2.jpg", Decision("relabel", "c"))
    assert rows(file) == [["path", "action", "label", "data"], ["a/1.jpg", "exclude", "", ""],
                          ["b/2.jpg", "relabel", "c", "photos"], ["c/3.jpg", "exclude", "", "photos"]]
    decisions.decide("a/1.jpg", Decision("keep"))  # the label is right after all: no correction, remembered
    assert [r[0] for r in rows(file)[1:]] == ["b/2.jpg", "c/3.jpg"]
    assert rows(tmp_path / "reviewed.csv") == [["path", "data"], ["a/1.jpg", "photos"]]
    assert decisions.current() == {"a/1.jpg": Decision("keep"), "b/2.jpg": Decision("relabel", "c"),
                                   "c/3.jpg": Decision("exclude")}
    assert decisions.undo() == "a/1.jpg"  # back where it stood, and forgotten as right
    assert rows(file)[1] == ["a/1.jpg", "exclude", "", ""]
    assert rows(tmp_path / "reviewed.csv") == [["path", "data"]]
    assert decisions.undo() == "b/2.jpg" and rows(file)[2] == ["b/2.jpg", "relabel", "a", ""]
    assert decisions.undo() == "c/3.jpg" and [r[0] for r in rows(file)[1:]] == ["a/1.jpg", "b/2.jpg"]
    assert decisions.undo() is None
    assert [(c.path, c.action, c.label) for c in read_corrections(file)] == [("a/1.jpg", "exclude", ""),
                                                                            ("b/2.jpg", "relabel", "a")]
    assert not list(tmp_path.glob("*.tmp"))  # written by rename, nothing half-written left


def test_a_malformed_corrections_file_stops_before_serving(tmp_path):
    file = tmp_path / "corrections.csv"
    file.write_text(HEADER + "a/1.jpg,delete,\n")
    with pytest.raises(Exception, match=r"corrections.csv, line 2: unknown action 'delete'"):
        Decisions(file, "photos")


def audited_project(root, suspects=3, missing=False):
    """A workspace with data/raw photos and the audit's outputs, as `dvc repro audit` leaves them."""
    make_folder(root / "data" / "raw", classes=3, per_class=4)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(data={"source": "folder", "path": "/x/photos"})))
    (root / "corrections.csv").write_text(HEADER)
    paths = sorted(p.relative_to(root / "data" / "raw").as_posix() for p in (root / "data" / "raw").rglob("*.jpg"))
    items = [{"path": paths[i], "split": "train", "given": paths[i].split("/")[0], "suggested": "class_2",
              "score": 0.01 * (i + 1), "top": [["class_2", 0.9], ["class_0", 0.05], ["class_1", 0.05]],
              "like_given": paths[4:6], "like_suggested": paths[8:10]} for i in range(suspects)]
    reports = root / "reports" / "audit"
    reports.mkdir(parents=True)
    (reports / "suspects.json").write_text(json.dumps({"classes": ["class_0", "class_1", "class_2"],
                                                       "suspects": items}))
    (reports / "cross_split_copies.csv").write_text(
        f"path_a,split_a,path_b,split_b,similarity\n{paths[0]},train,{paths[11]},test,0.97\n")
    if missing:
        (root / "data" / "raw" / paths[1]).unlink()
    return root, paths


@pytest.fixture
def client(tmp_path):
    root, paths = audited_project(tmp_path / "project", missing=True)
    layout = Layout(root)
    app = create_app(layout, load_audit(layout), Decisions(root / "corrections.csv", "photos"), "secret-token")
    return app.test_client(), root, paths


def test_only_the_audits_photos_are_served_by_number(client):
    http, root, paths = client
    assert http.get("/image/0/large").status_code == 200
    assert http.get("/image/0/thumb").headers["Content-Type"] == "image/jpeg"
    deleted = http.get("/api/suspects").get_json()["items"][1]["image"]
    for url in (f"/image/{deleted}/large",  # deleted since the audit: missing, yet decidable (below)
                "/image/999/large", "/image/0/huge", "/image/-1/large", "/image/../../etc/passwd",
                "/image/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", f"/data/raw/{paths[0]}", f"/image/{root}/x",
                "/image/0/..%2f..%2fparams.yaml", "/params.yaml"):
        assert http.get(url).status_code == 404, url


def test_a_decision_needs_this_starts_token(client):
    http, root, paths = client
    body = {"path": paths[0], "action": "exclude"}
    assert http.post("/api/decide", json=body).status_code == 403
    assert http.post("/api/decide", json=body, headers={"X-Review-Token": "guess"}).status_code == 403
    assert http.post("/api/undo", json={}).status_code == 403
    assert rows(root / "corrections.csv") == [["path", "action", "label"]]
    ok = http.post("/api/decide", json=body, headers={"X-Review-Token": "secret-token"})
    assert ok.status_code == 200 and ok.get_json()["reviewed"] == 1


def test_the_api_decides_pages_filters_and_the_later_decision_wins(client):
    http, root, paths = client
    token = {"X-Review-Token": "secret-token"}
    first = http.get("/api/suspects?offset=0&limit=2").get_json()
    assert (first["total"], first["all"], first["reviewed"], len(first["items"])) == (3, 3, 0, 2)
    assert first["items"][0]["path"] == paths[0] and first["items"][0]["like_given"][0]["path"] == paths[4]
    assert http.get("/api/suspects?given=class_1").get_json()["total"] == 0
    assert http.get("/api/suspects?given=class_0&split=train").get_json()["total"] == 3
    for body in ({"path": paths[1], "action": "exclude"},  # its photo is missing: still decidable
                 {"path": paths[1], "action": "relabel", "label": "class_1"}):  # a second tab, later
        assert http.post("/api/decide", json=body, headers=token).status_code == 200
    assert rows(root / "corrections.csv")[1:] == [[paths[1], "relabel", "class_1", "photos"]]
    kept = http.post("/api/decide", json={"path": paths[2], "action": "relabel", "label": "class_0"}, headers=token)
    assert kept.get_json()["decision"] == {"action": "keep", "label": ""}  # its own label: the label is right
    for bad in ({"path": "class_0/other.jpg", "action": "exclude"}, {"path": paths[0], "action": "delete"},
                {"path": paths[0], "action": "relabel", "label": "class_9"}):
        assert http.post("/api/decide", json=bad, headers=token).status_code == 400
    undone = http.post("/api/undo", json={}, headers=token).get_json()
    assert undone["path"] == paths[2] and undone["decision"] is None and undone["reviewed"] == 1
    copies = http.get("/api/copies").get_json()
    assert copies["total"] == 1 and copies["items"][0]["path_b"] == paths[11]


def test_decisions_survive_a_restart(tmp_path):
    root, paths = audited_project(tmp_path / "project")
    layout = Layout(root)
    token = {"X-Review-Token": "t"}
    http = create_app(layout, load_audit(layout), Decisions(root / "corrections.csv", "photos"), "t").test_client()
    http.post("/api/decide", json={"path": paths[0], "action": "keep"}, headers=token)
    http.post("/api/decide", json={"path": paths[1], "action": "exclude"}, headers=token)
    again = create_app(layout, load_audit(layout), Decisions(root / "corrections.csv", "photos"), "u").test_client()
    items = again.get("/api/suspects").get_json()["items"]
    assert [item["decision"] for item in items] == [{"action": "keep", "label": ""}, {"action": "exclude", "label": ""},
                                                    None]


def run_review(cwd, *args):
    return subprocess.run([sys.executable, "-m", "imgclf.review", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_no_audit_yet_says_which_command_to_run(tmp_path):
    root, _ = audited_project(tmp_path / "project")
    (root / "reports" / "audit" / "suspects.json").unlink()
    done = run_review(root)
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: no audit outputs in reports/audit: run `dvc repro audit` first")


def test_a_port_in_use_is_named(tmp_path):
    root, _ = audited_project(tmp_path / "project")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_review(root, "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} (") and "pass another port with --port" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_corrections_are_named_before_serving(tmp_path):
    root, _ = audited_project(tmp_path / "project")
    (root / "corrections.csv").write_text(HEADER + "class_0/x.jpg,relabel,\n")
    done = run_review(root)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {root / 'corrections.csv'}, line 2: relabel needs the new class in the label column"


def test_a_large_audit_is_served_in_pages(tmp_path):
    """10,000 suspects: each answer holds one page; bench/review.py times it."""
    root, paths = audited_project(tmp_path / "project")
    found = json.loads((root / "reports/audit/suspects.json").read_text())
    base = found["suspects"][0]
    found["suspects"] = [{**base, "path": f"class_0/img_{i:05d}.jpg"} for i in range(10_000)]
    (root / "reports/audit/suspects.json").write_text(json.dumps(found))
    layout = Layout(root)
    audit = load_audit(layout)
    assert isinstance(audit, Audit) and len(audit.suspects) == 10_000
    http = create_app(layout, audit, Decisions(root / "corrections.csv", "photos"), "t").test_client()
    answer = http.get("/api/suspects?offset=9950&limit=100000").get_json()
    assert (answer["total"], len(answer["items"]), answer["items"][-1]["path"]) == (10_000, 50, "class_0/img_09999.jpg")
