"""Data files that cannot silently mislead, caches and model files that fail
with a message (issue 14): each test is a case a careless user or an attacker
hits, on real images and real processes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import DATASETS, ROOT, need
from .conftest import imgclf as run_cli
from .servers import free_port


def _csv_data(tmp_path: Path, tiny: Path) -> Path:
    d = tmp_path / "csvdata"
    d.mkdir()
    rows = []
    for c, label in (("cats", "cat"), ("dogs", "dog")):
        for f in sorted((tiny / "train" / c).iterdir())[:15]:
            shutil.copy(f, d / f.name)
            rows.append(f"{f.name},{label}")
    extra = [rows[0], "./" + rows[20].split(",")[0] + ",cat", "cat.1.jpg, ", ",dog"]  # repeat, conflict, blank label, blank path
    (d / "labels.csv").write_bytes("\ufeff# exported from a spreadsheet\npath,label\n".encode() + "\n".join(rows + extra).encode() + b"\n")
    return d / "labels.csv"


def test_csv_problems_are_named_repaired_and_reported(tmp_path, tiny):
    csv = _csv_data(tmp_path, tiny)
    r = run_cli("check", csv)
    for line in ("line 33: repeats line 3", "line 34: labels dog.", "line 35: empty label", "line 36: empty path"):
        assert line in r.stdout, r.stdout
    out = tmp_path / "run"
    t = run_cli("train", csv, "--out", out, "--epochs", "5", "--no-evaluate")
    assert "empty label; row skipped" in t.stdout
    splits = json.loads((out / "splits.json").read_text())
    assert splits["classes"] == ["cat", "dog"]  # no class "" and no class "label" from a BOM'd header
    files = [p for k in ("train", "val", "test") for p, _ in splits[k]]
    assert len(files) == len(set(files)) == 30  # a repeated row never lands in two splits


def test_csv_not_utf8_names_the_file_and_line(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"path,label\na.jpg,cat\ncaf\xe9.jpg,cat\n")
    for cmd in ("check", "train"):
        p = run_cli(cmd, bad, check=False)
        assert p.returncode == 2 and f"{bad}, line 3: not UTF-8" in p.stderr and "CSV UTF-8" in p.stderr


def test_one_class_is_refused_before_training(tmp_path, tiny):
    d = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(tiny / split / "cats", d / split / "cats")
    for cmd in ("check", "train"):
        p = run_cli(cmd, d, "--out", tmp_path / "r", check=False) if cmd == "train" else run_cli(cmd, d, check=False)
        assert p.returncode == 2 and "found 1 class folder" in p.stderr and "at least 2" in p.stderr
    assert not (tmp_path / "r" / "model.pt").exists()


def test_class_missing_from_val_is_warned(tmp_path, tiny):
    d = tmp_path / "missing"
    shutil.copytree(tiny / "train", d / "train")
    shutil.copytree(tiny / "val" / "cats", d / "val" / "cats")
    r = run_cli("check", d)
    assert "warning: class(es) dogs have no images in val" in r.stdout


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("report", "*.onnx"))
    return run


def _bad_model_files(run: Path) -> dict[str, bytes]:
    good = (run / "model.pt").read_bytes()
    marker = run.parent / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = run.parent / "evil.pt"
    torch.save({"arch": Evil()}, evil)
    empty = run.parent / "empty.pt"
    torch.save({}, empty)
    bare = pickle.dumps({"arch": "x", "state_dict": [1, 2]})  # not torch.save's zip: torch warned before failing
    return {"truncated": good[: len(good) // 3], "code": evil.read_bytes(), "empty": empty.read_bytes(),
            "bare_pickle": bare}


@pytest.mark.parametrize("kind", ["truncated", "code", "empty", "bare_pickle"])
def test_bad_model_file_gives_a_message_in_every_command(run_copy, tiny, kind):
    run = run_copy
    (run / "model.pt").write_bytes(_bad_model_files(run)[kind])
    img = next((tiny / "val" / "cats").iterdir())
    commands = [("predict", run, img), ("serve", run, "--port", str(free_port()))]
    if kind == "truncated":  # the other kinds fail in the same loader; two commands suffice for them
        commands += [("evaluate", run), ("export", run)]
    for args in commands:
        p = run_cli(*args, check=False, timeout=120)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and str(run / "model.pt") in p.stderr, (args, p.stderr)
        assert "weights_only=False" not in p.stderr and "imgclf serve:" not in p.stdout  # no banner before failing
        assert p.stderr.lstrip().startswith("imgclf "), (args, p.stderr)  # imgclf's message first, no warnings
    assert not (run.parent / "PWNED").exists()


def test_bad_checkpoint_on_resume(run_copy):
    run = run_copy
    (run / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    p = run_cli("train", "--resume", "--out", run, check=False)
    assert p.returncode == 2 and f"{run / 'last.pt'}: cannot be loaded" in p.stderr and "Traceback" not in p.stderr


def test_corrupt_cached_backbone_and_shards_are_rebuilt(tiny_run, tiny, tmp_path):
    run, _ = tiny_run
    cache = tmp_path / "cache"
    img = str(next((tiny / "val" / "dogs").iterdir()))
    first = run_cli("predict", run, img, "--cache-dir", cache, "--format", "json")
    [onnx] = list((cache / "onnx").glob("backbone-*.onnx"))
    os.truncate(onnx, 1_000_000)
    again = run_cli("predict", run, img, "--cache-dir", cache, "--format", "json")
    assert "is damaged; rebuilding it" in again.stderr and "Traceback" not in again.stderr
    assert json.loads(again.stdout[again.stdout.index("["):])[0]["label"] == "dogs"
    assert json.loads(first.stdout)[0]["score"] == pytest.approx(json.loads(again.stdout[again.stdout.index("["):])[0]["score"])
    # A damaged feature shard: reported, removed, recomputed.
    run_cli("evaluate", run, "--cache-dir", cache, "--no-report")
    shard = max((cache / "features").rglob("shard-*.npy"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:500])
    e = run_cli("evaluate", run, "--cache-dir", cache, "--no-report")
    assert "is damaged; removed" in e.stderr and not shard.exists()


def test_feature_extraction_keeps_its_work_when_killed(tmp_path):
    """Shards are written as extraction goes: a run killed mid-way leaves
    features that the next run reads instead of computing."""
    data = need(DATASETS / "hymenoptera")
    cache = tmp_path / "cache"
    env = {**os.environ, "IMGCLF_FLUSH_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "imgclf", "train", str(data), "--cache-dir", str(cache), "--no-evaluate"]
    p = subprocess.Popen(cmd + ["--out", str(tmp_path / "a")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cache.glob("features/*/shard-*.npy")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "a" / "model.pt").exists()  # killed during feature extraction
    r = subprocess.run(cmd + ["--out", str(tmp_path / "b")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("features:"))
    from_cache = int(line.split("; ")[1].split("/")[0])
    assert 0 < from_cache < 245, line


def test_empty_class_folder_is_caught(tmp_path, tiny):
    d = tmp_path / "empty"
    shutil.copytree(tiny / "train" / "cats", d / "cats")
    (d / "dogs").mkdir()
    (d / "dogs" / "notes.txt").write_text("not an image")
    p = run_cli("train", d, "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and "dogs have no readable training images" in p.stderr


# ---------------------------------------------------------------- files that were skipped stay skipped (issue 27)

def _small_data(root: Path, tiny: Path, n: int = 10) -> Path:
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for f in sorted((tiny / "train" / c).iterdir())[:n]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny) -> tuple[Path, Path, str]:
    """A small run trained on a folder holding links to /dev/urandom and
    /dev/zero, a FIFO and a dangling link: (data, run, train's stdout)."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = _small_data(tmp / "data", tiny)
    os.symlink("/dev/urandom", data / "cats" / "urandom.jpg")
    os.symlink("/dev/zero", data / "dogs" / "zero.jpg")
    os.mkfifo(data / "cats" / "fifo.jpg")
    os.symlink(tmp / "nowhere.jpg", data / "dogs" / "dangling.jpg")
    run = tmp / "run"
    # --follow-links: without it these links leave the data folder and are skipped unread (test_data.py);
    # followed, the files' own type must keep them from being read.
    t = run_cli("train", data, "--out", run, "--no-evaluate", "--follow-links", timeout=300)  # a hang fails, not stalls
    return data, run, t.stdout + t.stderr  # the story on stdout, skipped files (warnings) on stderr


def test_devices_fifos_and_dangling_links_are_skipped_and_left_out_of_the_split(hostile_run):
    data, run, out = hostile_run
    assert "cats/urandom.jpg: a character device" in out and "dogs/zero.jpg: a character device" in out
    assert "cats/fifo.jpg: a FIFO" in out and "dogs/dangling.jpg: cannot read file: file not found" in out
    assert "empty file" not in out
    splits = json.loads((run / "splits.json").read_text())
    listed = {p for k in ("train", "val", "test") for p, _ in splits[k]}
    assert len(listed) == 20 and not {"cats/urandom.jpg", "dogs/zero.jpg", "cats/fifo.jpg", "dogs/dangling.jpg"} & listed
    assert "split: 16 train, 2 val, 2 test" in out  # counts of readable images only
    assert "skipped 4 unreadable file(s)" in out and out.count("skipped cats/urandom.jpg") == 1  # one count, once each


def test_csv_row_naming_a_device_is_skipped(tmp_path, tiny):
    from imgclf.data.datasets import discover
    from imgclf.data.loading import scan

    data = _small_data(tmp_path / "d", tiny, n=4)
    rows = [f"{c}/{f.name},{c}" for c in ("cats", "dogs") for f in sorted((data / c).iterdir())]
    (data / "labels.csv").write_text("\n".join(["path,label", *rows, "/dev/zero,cats"]) + "\n")
    s = discover(data / "labels.csv")
    bad = dict(scan(s))
    assert "a character device" in bad["/dev/zero"]
    assert all(p != "/dev/zero" for k in ("train", "val", "test") for p, _ in getattr(s, k))


def test_files_gone_after_training_are_named_once_and_skipped(hostile_run, tmp_path):
    data, run, _ = hostile_run
    splits = json.loads((run / "splits.json").read_text())
    gone, device = splits["train"][0][0], splits["train"][-1][0]
    (data / gone).unlink()  # deleted after training
    (data / device).unlink()
    os.symlink("/dev/zero", data / device)  # and one replaced by a device: never read forever
    img = next(p for p in sorted((data / "cats").iterdir()) if p.is_file() and not p.is_symlink() and p.stat().st_size)
    cache = tmp_path / "cache"  # cold: every file is hashed and read again
    for args in (("evaluate", run, "--split", "train", "--no-report"), ("embed", "--run", run, "--out", tmp_path / "e.npy"),
                 ("similar", run, img)):
        p = run_cli(*args, "--cache-dir", cache, check=False, timeout=300)
        both = p.stdout + p.stderr
        assert p.returncode == 0 and "Traceback" not in both, (args, both)
        assert both.count(f"skipped {gone}: cannot read file: file not found") == 1, (args, both)
        assert both.count(f"skipped {device}: a character device") == 1, (args, both)


def test_feature_cache_keys_the_bytes_it_decoded(tmp_path, tiny):
    """A file rewritten between hashing and decoding (a training file edited
    while `train` reads it, then restored) must not leave another image's
    features under its own hash."""
    import numpy as np

    from imgclf.data.loading import file_hash, hash_files
    from imgclf.data.preprocess import Preprocess
    from imgclf.models.features import FeatureExtractor, extract, feature_caches
    from imgclf.models.registry import build_model

    a, b = sorted((tiny / "train" / "cats").iterdir())[:1] + sorted((tiny / "train" / "dogs").iterdir())[:1]
    hash_a, hash_b = file_hash(a), file_hash(b)
    shutil.copy(a, tmp_path / "a.jpg")
    shutil.copy(b, tmp_path / "b.jpg")
    pp = Preprocess(size=32)
    ext = FeatureExtractor(build_model("small_cnn", 2, pretrained=False).backbone, pp, torch.device("cpu"), "torch")
    items = [("a.jpg", 0), ("b.jpg", 1)]
    hashes = hash_files([tmp_path / r for r, _ in items])  # hashed first (as training does)...
    (tmp_path / "a.jpg").write_bytes(b.read_bytes())  # ...then rewritten before it is decoded
    caches = feature_caches(tmp_path / "cache", "small_cnn", ext.backbone_hash, pp, ("plain",))
    feats, _, kept = extract(ext, tmp_path, items, caches, workers=0, progress=False, hashes=hashes)
    assert list(kept) == [0, 1] and hashes[0] == hash_b  # the features are b's, keyed as b
    fresh = feature_caches(tmp_path / "cache", "small_cnn", ext.backbone_hash, pp, ("plain",))["plain"]
    assert (fresh.locate([hash_a])[:, 0] < 0).all()  # a's hash holds no one's features
    shutil.copy(a, tmp_path / "a.jpg")  # restored: a's own features are computed, not b's served
    again, _, _ = extract(ext, tmp_path, items[:1], feature_caches(tmp_path / "cache", "small_cnn", ext.backbone_hash,
                                                                     pp, ("plain",)), workers=0, progress=False)
    assert not np.allclose(again["plain"][0], feats["plain"][1])


def test_one_writer_per_run_directory(tmp_path, tiny):
    """A second `train --out D` while another holds D refuses, naming the
    holder; the lock of a run that died is taken over with a note; and files
    of two runs in one folder are refused at load."""
    data, run = _small_data(tmp_path / "d", tiny, n=6), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from imgclf.runs import RunLock\n"
                               f"with RunLock({str(run)!r}, 'first'):\n    print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = run_cli("train", data, "--out", run, "--no-evaluate", check=False, timeout=120)
        assert p.returncode == 2 and f"is being written by another imgclf run (pid {holder.pid} on host" in p.stderr
        assert not (run / "splits.json").exists()
    finally:
        holder.kill()  # dies holding it: the lock file still names it
        holder.wait()
    t = run_cli("train", data, "--out", run, "--no-evaluate", timeout=300)
    assert f"took over the lock of an earlier run that stopped without releasing it (pid {holder.pid}" in t.stdout
    ids = {json.loads((run / f).read_text())["run_id"] for f in ("splits.json", "config.json")}
    ids.add(torch.load(run / "model.pt", weights_only=True)["run_id"])
    assert len(ids) == 1 and "" not in ids
    s = json.loads((run / "splits.json").read_text())
    (run / "splits.json").write_text(json.dumps({**s, "run_id": "another"}))  # as a second writer would leave it
    e = run_cli("evaluate", run, "--no-report", check=False, timeout=120)
    assert e.returncode == 2 and "mixes files of different runs" in e.stderr and "splits.json: run another" in e.stderr


_ORT_SESSION = """
import sys
if sys.argv[1] == "imgclf":
    import imgclf  # noqa: F401 (what every imgclf command imports first)
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
if sys.argv[1] == "imgclf":
    from imgclf.ort import ort_session
    session = ort_session(model)
else:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
session.run(None, {"x": np.ones(1, np.float32)})
"""


def test_onnxruntime_writes_no_telemetry(tmp_path):
    """Plain onnxruntime records a session event under ~/.cache/Microsoft
    (so this test can see it); under imgclf nothing is written."""
    # onnxruntime itself stays quiet where CI is set (as in this project's CI): both runs go without it,
    # so the plain one shows what a user's machine gets and the imgclf one that imgclf stops it.
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    found = {}
    for who in ("plain", "imgclf"):
        home = tmp_path / who
        home.mkdir()
        subprocess.run([sys.executable, "-c", _ORT_SESSION, who], cwd=ROOT, env={**env, "HOME": str(home)},
                       check=True, timeout=120)
        found[who] = sorted(p.name for p in home.rglob("*") if p.is_file())
    assert "onnxruntime.db" in found["plain"]
    assert found["imgclf"] == []


_LIMITED = """
import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "imgclf"
runpy.run_module("imgclf", run_name="__main__")
"""


def _limited(limit: int, *args) -> subprocess.CompletedProcess:
    """The CLI under a real file-size limit (`ulimit -f`)."""
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_file_size_limit_gives_one_line_naming_the_file(hostile_run, tmp_path, tiny):
    """Under `ulimit -f`: the cache falls back to none with one line; a run,
    an export and a report that cannot be written each end in one line naming
    the file, the cause and the fix; no traceback, no hang (workers' batches
    are files too)."""
    data, trained, _ = hostile_run
    run = tmp_path / "run"
    t = _limited(1_000_000, "train", data, "--out", run, "--no-evaluate", "--cache-dir", tmp_path / "cache")
    assert t.returncode == 2 and "Traceback" not in t.stderr, t.stderr
    assert f"cannot write {run / 'model.pt'}: the file-size limit (ulimit -f) is too small for it (EFBIG)" in t.stderr
    assert t.stderr.count("note: feature cache: cannot write") == 1 and "going on without the cache" in t.stderr
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("report", "similar*"))
    e = _limited(1_000_000, "export", copy, "--format", "onnx")
    assert e.returncode == 2 and "Traceback" not in e.stderr, e.stderr
    assert f"cannot write {copy / 'model.onnx'}" in e.stderr and "(EFBIG)" in e.stderr
    r = _limited(20_000, "evaluate", copy)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write {copy}" in r.stderr and "(EFBIG)" in r.stderr


def test_class_names_cannot_break_the_data_map(tmp_path):
    """JSON in a page escapes <, > and &: a class named "<!--<script>" once put
    Chromium's parser in its escaped-script state, swallowing the map's own
    script and everything after it."""
    import numpy as np

    from imgclf.data_engine.data_map import MAP_CSS, render_map

    from .browser import browser_page

    classes = ["<!--<script>", "a&b</script><b>x"]
    points = [{"path": f"{c}/{i}.jpg", "true": k, "pred": 1 - k, "split": "eval", "wrong": True, "suspect": False}
              for k, c in enumerate(classes) for i in range(2)]
    xy = np.array([[0.1, 0.1], [0.9, 0.9], [0.1, 0.9], [0.9, 0.1]])
    page_html = (f"<!doctype html><html><head><meta charset='utf-8'><style>{MAP_CSS}</style></head><body>"
                 f"{render_map(points, xy, classes, {})}<footer id='end'>the end</footer></body></html>")
    (tmp_path / "map.html").write_text(page_html)
    with browser_page() as page:
        page.goto((tmp_path / "map.html").as_uri())
        page.wait_for_load_state("load")
        assert page.locator("#end").count() == 1 and page.inner_text("#end") == "the end"  # nothing swallowed
        assert page.locator("#data-map .pt").count() == 4
        page.hover('#data-map [data-i="0"]')
        card = page.locator("#map-card")
        card.wait_for(state="visible", timeout=5000)  # the map's script ran
        assert "<!--<script>" in card.inner_text() and "a&b</script><b>x" in card.inner_text()


def test_class_names_are_never_parsed_as_math():
    """Labels are text: "$\\notacmd{$" once crashed evaluate (matplotlib mathtext)."""
    import numpy as np

    from imgclf.evaluation.figures import confusion_png, roc_pr_png

    classes = ["$\\notacmd{$", "price_$5_$"]
    assert confusion_png(np.array([[3, 1], [0, 4]]), classes, normalize=True).startswith(b"\x89PNG")
    three = classes + ["third $x^$"]
    curves = {"per_class": {c: {"fpr": [0, 1], "tpr": [0, 1], "precision": [1, 0.5], "recall": [0, 1],
                                "roc_auc": 0.5, "average_precision": 0.5} for c in three}}
    assert roc_pr_png(curves, three).startswith(b"\x89PNG")  # legends carry the names
