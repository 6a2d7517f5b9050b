"""Run tracking (`imgclf train --log tensorboard,mlflow`): a real small run,
then what it logged read back with each tool's own reader: TensorBoard's
EventAccumulator on RUN/tensorboard, MLflow's client on the local sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imgclf.io import read_history
from imgclf.training.tracking import Tracker, parse_sinks
from tests.conftest import imgclf
from tests.test_detect_cli import bccd_voc

SMALL = ["--model", "small_cnn", "--image-size", "32", "--epochs", "3", "--patience", "50", "--batch-size", "50",
         "--workers", "0"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("track") / "run"
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the default: a store under the run
    try:
        imgclf("train", tiny, "--out", out, *SMALL, "--log", "tensorboard,mlflow")
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    return out


def test_tensorboard_event_files_hold_every_epoch(tracked):
    acc = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"images": 0}).Reload()
    hist = read_history(tracked / "history.csv")
    tags = acc.Tags()["scalars"]
    for tag in ("train_loss", "val_loss", "val_acc", "lr", "train_images_per_s"):
        assert tag in tags, (tag, tags)
    val_acc = acc.Scalars("val_acc")
    assert [e.step for e in val_acc] == [int(r["epoch"]) for r in hist] == [1, 2, 3]
    assert [round(e.value, 4) for e in val_acc] == [round(float(r["val_acc"]), 4) for r in hist]
    assert all(e.value > 0 for e in acc.Scalars("train_images_per_s"))
    assert "test_accuracy" in tags  # the held-out figures at the end
    img = acc.Images("test/confusion_matrix")[0]
    assert img.width > 100 and img.height > 100 and img.encoded_image_string[:4] == b"\x89PNG"


def test_mlflow_store_holds_params_metrics_report_and_model(tracked):
    client = MlflowClient(tracking_uri=f"sqlite:///{tracked / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgclf")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model"] == "small_cnn" and run.data.params["epochs"] == "3"
    hist = read_history(tracked / "history.csv")
    val_acc = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted((m.step, round(m.value, 4)) for m in val_acc) == [
        (int(r["epoch"]), round(float(r["val_acc"]), 4)) for r in hist]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 3
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "summary.json", "history.csv", "config.json", "figures"} <= files, files
    # artifacts live under the run, not in ./mlruns of wherever training ran
    local = client.download_artifacts(run.info.run_id, "summary.json")
    assert (tracked / "summary.json").read_text() == open(local).read()
    assert str(tracked.resolve()) in run.info.artifact_uri


def test_unknown_tracker_is_refused_with_the_choices(tiny, tmp_path):
    p = imgclf("train", tiny, "--out", tmp_path / "r", "--log", "wandb", check=False)
    assert p.returncode != 0 and "--log 'wandb'" in p.stderr and "tensorboard,mlflow" in p.stderr


def test_missing_mlflow_gives_the_install_line(tiny, tmp_path):
    """With mlflow not importable (as where the extra is not installed), one line says which extra to install."""
    shadow = tmp_path / "site"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "imgclf", "train", str(tiny), "--out", str(tmp_path / "r"), *SMALL,
                        "--log", "mlflow"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0
    assert "pip install 'imgclf[mlflow]'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_detection_run_is_tracked_too(tmp_path):
    """The detection recipe feeds the same tracker: per-epoch mAP in the event
    files, the held-out mAP in the MLflow run (a 12-image BCCD subset, 2 epochs;
    about a minute on 2 busy cores)."""
    data = bccd_voc(tmp_path / "bccd", n_train=8, n_val=2, n_test=2)
    out = tmp_path / "det"
    imgclf("train", data, "--out", out, "--epochs", "2", "--image-size", "128", "--log", "tensorboard,mlflow")
    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("val_map")] == [1, 2]
    assert "loss" in acc.Tags()["scalars"] and "lr" in acc.Tags()["scalars"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["task"] == "detect"
    assert 0.0 <= run.data.metrics["test_map"] <= 1.0
    assert "model.pt" in {f.path for f in client.list_artifacts(run.info.run_id)}


def test_tensorboard_flag_is_an_alias_of_log_tensorboard():
    assert parse_sinks("", tensorboard=True) == ["tensorboard"]
    assert parse_sinks("mlflow", tensorboard=True) == ["tensorboard", "mlflow"]
    assert parse_sinks(" MLflow , tensorboard,mlflow") == ["mlflow", "tensorboard"]
    assert parse_sinks("") == [] and not Tracker.open([], Path("unused"), {})
