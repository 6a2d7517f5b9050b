"""Inputs from none of the classes: the session's cats-vs-dogs model with
`--reject auto` answers "unknown" for ants and bees, still answers cats and
dogs it has never seen, and says so the same way in PyTorch, in an ONNX file
exported with the rejection baked in (its own `rejected` output) and from a
real server; `evaluate --unknown` reports AUROC and the trade-off."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import imgclf

from .conftest import DATASETS
from .conftest import imgclf as run_cli
from .servers import running_server


@pytest.fixture(scope="module")
def rejecting_run(tiny_run, tmp_path_factory):
    """The session's run (trained with rejection off) and an export with --reject auto baked in."""
    out, _ = tiny_run
    onnx_path = tmp_path_factory.mktemp("open") / "rejecting.onnx"
    run_cli("export", out, "--reject", "auto", "--out", onnx_path)
    return out, onnx_path


def _files(folder, step):
    return [str(p) for c in sorted(folder.iterdir()) for p in sorted(c.iterdir())[::step]]


@pytest.fixture(scope="module")
def images():
    """Ants and bees (unknown), and cats and dogs from outside the training data (known, never seen)."""
    unknown = _files(DATASETS / "hymenoptera" / "val", 4)
    known_dir = DATASETS / "cats_and_dogs_filtered" / "validation"
    known = _files(known_dir, 5)
    return unknown, known, [p.split("/")[-2] for p in known]


def test_unknowns_rejected_known_kept_everywhere(rejecting_run, images, tmp_path):
    run, onnx_path = rejecting_run
    unknown, known, truth = images
    clf = imgclf.load(run)
    assert clf.reject is None and clf.has_unknown  # trained with the default: score on, rejection off
    clf.set_reject("auto")
    assert clf.reject == pytest.approx(0.95)
    r_unk, r_known = clf.predict(unknown), clf.predict(known)
    rejected = np.mean([r["label"] == "unknown" for r in r_unk])
    correct = np.mean([r["label"] == y for r, y in zip(r_known, truth)])
    # "auto" keeps 95% of the 100 validation images, so it rejects 5% of new known
    # images give or take the noise of that 95th percentile (about 2 points) and of
    # this sample (200 images, about 1.7): expect about 0.94 correct; 0.87 is 2.5 SE below.
    assert rejected >= 0.90 and correct >= 0.87, (rejected, correct)
    from sklearn.metrics import roc_auc_score

    scores = [r["unknown"] for r in r_known + r_unk]
    assert roc_auc_score([0] * len(r_known) + [1] * len(r_unk), scores) >= 0.95

    # The exported file decides inside the graph, with the threshold baked in at export.
    onnx_clf = imgclf.load(onnx_path)
    assert onnx_clf.reject == pytest.approx(0.95)
    sample = unknown[:6] + known[:6]
    ref = clf.predict(sample)
    assert [r["label"] for r in onnx_clf.predict(sample)] == [r["label"] for r in ref]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.stack([onnx_clf.prepare(p) for p in sample])
    graph_rejected = sess.run(["rejected"], {"images": x})[0]
    assert list(graph_rejected) == [r["label"] == "unknown" for r in ref]

    # A real server without torch, same answers; --reject off keeps the score but not the rejection.
    with running_server(onnx_path, tmp_path / "server.log", torch_free=True) as (url, _):
        import httpx

        files = [("file", (f"{i}.jpg", open(p, "rb").read())) for i, p in enumerate(sample)]
        got = httpx.post(url + "/v1/predict", files=files, timeout=60).json()["predictions"]
    assert [g["label"] for g in got] == [r["label"] for r in ref]
    assert all(abs(g["unknown"] - r["unknown"]) <= 0.011 for g, r in zip(got, ref))
    onnx_clf.set_reject("off")
    assert all(r["label"] != "unknown" and "unknown" in r for r in onnx_clf.predict(unknown[:3]))


def test_evaluate_unknown_section(rejecting_run, images, tmp_path):
    run = tmp_path / "run"  # a copy: the session's run and its report stay as other tests expect
    shutil.copytree(rejecting_run[0], run, ignore=shutil.ignore_patterns("*.onnx", "*.ort", "report"))
    folder = tmp_path / "ood"
    for i, p in enumerate(images[0][:30]):
        (folder / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(open(p, "rb").read())
    p = run_cli("evaluate", run, "--unknown", folder, "--no-suspects", "--no-gradcam")
    assert "AUROC" in p.stdout
    u = json.loads((run / "eval_val.json").read_text())["unknown"]
    assert u["n_unknown"] == 30 and u["auroc"] >= 0.95
    at_auto = [r for r in u["tradeoff"] if r["threshold"] == 0.95]
    assert at_auto and at_auto[0]["unknown_rejected"] >= 0.9
    html = (run / "report" / "index.html").read_text()
    assert 'id="unknown-tradeoff"' in html and "AUROC" in html


def test_bad_reject_values_are_messages(rejecting_run, images):
    run, _ = rejecting_run
    p = run_cli("predict", run, images[0][0], "--reject", "2", check=False)
    assert p.returncode != 0 and "--reject '2'" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("train", DATASETS / "cats_dogs_tiny", "--out", "/nonexistent/x", "--reject", "maybe", check=False)
    assert p.returncode != 0 and "--reject" in p.stderr and "Traceback" not in p.stderr
