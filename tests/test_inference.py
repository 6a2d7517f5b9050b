"""One inference path: the same real images give the same probabilities
through imgclf.load(run), imgclf.load(model.onnx), the server with each
backend and `imgclf evaluate`; a fresh run is calibrated; an export knows
when the run it came from has changed since."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import imgclf

from .conftest import ROOT
from .conftest import imgclf as run_cli
from .test_export import export_once

ATOL = 1e-5


@pytest.fixture(scope="module")
def val_files(tiny_run):
    run, _ = tiny_run
    splits = json.loads((run / "splits.json").read_text())
    items = splits["val"][::9]  # both classes (the split is sorted by class)
    return [(rel, f"{splits['root']}/{rel}") for rel, _ in items]


def _server_probs(model: str, paths: list[str], classes: list[str]) -> np.ndarray:
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(model))) as c:
        files = [("file", (f"{i}.jpg", open(p, "rb").read())) for i, p in enumerate(paths)]
        r = c.post("/v1/predict", files=files, data={"top_k": str(len(classes))})
        assert r.status_code == 200, r.text
    out = np.zeros((len(paths), len(classes)))
    for i, pred in enumerate(r.json()["predictions"]):
        for t in pred["top"]:
            out[i, classes.index(t["label"])] = t["score"]
    return out


def test_same_probabilities_everywhere(tiny_run, tmp_path_factory, val_files):
    run, _ = tiny_run
    onnx_path, _ = export_once(tiny_run, tmp_path_factory)
    paths = [p for _, p in val_files]
    torch_clf = imgclf.load(run)
    classes = torch_clf.classes
    ref = torch_clf.predict_proba(paths)
    assert ref.shape == (len(paths), 2) and len(set(ref.argmax(1))) == 2
    results = {"imgclf.load(model.onnx)": imgclf.load(onnx_path).predict_proba(paths),
               "imgclf.load(run, engine=torch)": imgclf.load(run, engine="torch").predict_proba(paths),
               "serve model.onnx": _server_probs(str(onnx_path), paths, classes),
               "serve run": _server_probs(str(run), paths, classes)}
    run_cli("evaluate", run, "--no-report", "--tta", "flip")  # the CSV holds what predict returns, TTA or not
    rows = {r["path"]: r for r in csv.DictReader(open(run / "predictions_val.csv"))}
    results["imgclf evaluate"] = np.array([[float(rows[rel][f"p_{c}"]) for c in classes] for rel, _ in val_files])
    for name, p in results.items():
        assert np.abs(p - ref).max() <= ATOL, (name, np.abs(p - ref).max())


def test_fresh_run_is_calibrated(tiny_run):
    run, proc = tiny_run
    rec = torch.load(run / "model.pt", weights_only=True)
    cal = rec["calibration"]
    assert rec["temperature"] == pytest.approx(cal["temperature"])
    # Fitted on val, scored honestly (cross-fitted): a temperature is kept only where it helps.
    if "declined_temperature" in cal:
        assert rec["temperature"] == 1.0 and cal["declined_temperature"] != 1.0
        assert cal["declined_nll"] >= cal["nll_before"] and "T = 1 kept" in proc.stdout
    else:
        assert rec["temperature"] != 1.0 and f"calibration: T = {rec['temperature']:.3f}" in proc.stdout
        assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] < cal["nll_before"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == pytest.approx(rec["temperature"])
    assert "ECE" in proc.stdout


def test_stale_export_warns(tiny_run, tmp_path):
    """An .onnx records the hash of the model.pt it came from; after the run
    changes, predicting or serving with the old export says so."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("report", "*.onnx"))
    run_cli("export", run)
    img = str(next((ROOT.parent / "shared" / "datasets" / "cats_dogs_tiny" / "val" / "cats").iterdir()))
    fresh = run_cli("predict", run / "model.onnx", img)
    assert "warning" not in fresh.stderr
    rec = torch.load(run / "model.pt", weights_only=True)
    rec["temperature"] = 2.0  # as a recalibration or retraining would
    torch.save(rec, run / "model.pt")
    stale = run_cli("predict", run / "model.onnx", img)
    assert "has changed since" in stale.stderr and f"imgclf export {run}" in stale.stderr


def test_cli_errors_are_messages_and_bugs_are_tracebacks(tmp_path):
    p = run_cli("evaluate", tmp_path / "nope", check=False)
    assert p.returncode == 2 and p.stderr.startswith("imgclf evaluate: error:") and "Traceback" not in p.stderr
    assert "imgclf train" in p.stderr  # the fix
    code = ("import sys, imgclf.cli as c\n"
            "def boom(cfg): raise KeyError('a bug')\n"
            "c.COMMANDS['models'] = (c.C.ModelsConfig, boom, 'x')\n"
            "sys.exit(c.main(['models']))")
    bug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr
