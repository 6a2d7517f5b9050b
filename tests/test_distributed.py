"""Distributed training with real processes: torchrun, two gloo ranks on
127.0.0.1, one thread each, real images (cats_dogs_tiny)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import imgclf

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV,
                       cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def cached(cache: Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """variant -> {hash: (writer rank, float16 vector)} from the shard files themselves."""
    out = {}
    for d in (cache / "features").iterdir():
        variant = json.loads((d / "meta.json").read_text())["variant"]
        for shard in d.glob("shard-*.npy"):
            rank = shard.name.split("-")[2]
            for rec in np.load(shard):
                out.setdefault(variant, {})[rec["hash"].decode()] = (rank, rec["f"])
    return out


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist-cache")


def test_two_ranks_encode_disjoint_shares_and_rank0_writes_one_run(tmp_path, tiny, shared_cache):
    out = tmp_path / "run"
    p = torchrun("--standalone", "--nproc-per-node", 2, "-m", "imgclf", "train", tiny, "--out", out,
                 "--cache-dir", shared_cache, "--image-size", 96, "--epochs", 10, "--flip-features", "--head-fit", "epochs")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "nodes": 1, "backend": "gloo", "per_rank_batch": 32,
                                      "global_batch": 64}
    assert sorted(f.name for f in out.iterdir() if not f.name.startswith(".")) == ["config.json", "eval_val.json", "history.csv", "last.pt",
                                                     "model.pt", "predictions_val.csv", "splits.json", "summary.json"]
    assert p.stdout.count("head epoch   1/10") == 1 and p.stdout.count("done in") == 1  # rank 0 alone speaks
    assert "300 images encoded by 2 processes" in p.stdout

    # Each image was encoded by exactly one rank, and together they cover train (both variants) and val.
    feats = cached(shared_cache)
    splits = json.loads((out / "splits.json").read_text())
    from imgclf.data.loading import file_hash

    want = {file_hash(tiny / rel) for part in ("train", "val") for rel, _ in splits[part]}
    assert set(feats["plain"]) == want
    assert set(feats["flip"]) == {file_hash(tiny / rel) for rel, _ in splits["train"]}
    writers = {r for r, _ in feats["plain"].values()}
    assert writers == {"0", "1"}

    # One process, its own cache: the same features, the same model.
    one = tmp_path / "one"
    imgclf("train", tiny, "--out", one, "--cache-dir", tmp_path / "one-cache", "--image-size", 96, "--epochs", 10,
           "--flip-features", "--head-fit", "epochs")
    single = cached(tmp_path / "one-cache")
    for v in ("plain", "flip"):
        assert single[v].keys() == feats[v].keys()
        gap = max(np.abs(single[v][h][1].astype(np.float32) - f.astype(np.float32)).max() for h, (_, f) in feats[v].items())
        assert gap <= 2e-3  # float16 rounding of the same numbers
    acc = [json.loads((r / "eval_val.json").read_text())["accuracy"] for r in (out, one)]
    assert abs(acc[0] - acc[1]) <= 0.01 and acc[0] >= 0.75


def test_ddp_takes_the_steps_of_one_process_with_the_global_batch(tmp_path, tiny):
    torchrun("--standalone", "--nproc-per-node", 2, "tests/dist_steps.py", tiny, tmp_path / "ddp.pt")
    subprocess.run([sys.executable, "tests/dist_steps.py", tiny, tmp_path / "one.pt"], check=True, env=ENV, cwd=ROOT,
                   timeout=120)
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    assert torch.equal(ddp["every_rank"][0], ddp["every_rank"][1])  # replicas never drift apart
    from tests.dist_steps import net

    start = torch.cat([p.detach().flatten() for p in net().parameters()])
    moved = (ddp["params"] - start).abs().max().item()
    assert moved > 0.05  # it trained
    assert (ddp["params"] - one["params"]).abs().max().item() <= 1e-5  # summation order only


def _workers(pid: int) -> list[int]:
    """torchrun's worker processes (its children)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in kids.read_text().split()] if kids.exists() else []


def test_killed_rank_fails_the_job_and_resume_completes_it(tmp_path, tiny, shared_cache):
    out = tmp_path / "run"
    args = ["-m", "imgclf", "train", tiny, "--out", out, "--cache-dir", shared_cache, "--model", "small_cnn",
            "--image-size", 64, "--epochs", 4, "--workers", 0, "--patience", 10]
    job = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *map(str, args)], env=ENV, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert (out / "last.pt").exists(), job.communicate()[0]
    victims = _workers(job.pid)
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    log, _ = job.communicate(timeout=120)  # torchrun notices and ends the other rank: no hang
    assert job.returncode != 0, log
    assert not (out / "summary.json").exists()

    # A different number of processes cannot continue an image stage: said plainly.
    p = imgclf("train", "--resume", "--out", out, check=False)
    assert p.returncode == 2 and "2 process(es) and this resume has 1" in p.stderr
    assert "--nproc-per-node 2" in p.stderr

    # The convenience launcher hands over to torchrun; the run finishes where it stopped.
    p = imgclf("train", "--resume", "--out", out, "--nproc-per-node", 2, "--workers", 0)
    assert "resuming" in p.stdout
    from imgclf.io import read_history

    epochs = [int(r["stage_epoch"]) for r in read_history(out / "history.csv")]
    assert epochs == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["distributed"]["world_size"] == 2


def test_two_nodes_simulated_on_one_machine(tmp_path, tiny, shared_cache):
    out, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", r,
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
                               "-m", "imgclf", "train", str(tiny), "--out", str(out), "--cache-dir", str(shared_cache),
                               "--image-size", "96", "--epochs", "10"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in ("0", "1")]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["nodes"] == 2
    assert sum(log.count("done in") for log in logs) == 1
    assert json.loads((out / "eval_val.json").read_text())["accuracy"] >= 0.75


def test_head_trains_from_memory_mapped_shards(tmp_path, tiny, shared_cache):
    """Above IMGCLF_FEATURES_IN_MEMORY_MB the head reads its features from the
    memory-mapped cache batch by batch (a million images' worth); the batches,
    and so the training, are the same as from memory."""
    from imgclf.io import read_history

    hist = []
    for name, limit in (("ram", "256"), ("mmap", "0")):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "imgclf", "train", str(tiny), "--out", str(out), "--cache-dir",
                        str(shared_cache), "--image-size", "96", "--epochs", "6", "--no-evaluate", "--head-fit", "epochs"],
                       check=True,
                       env={**ENV, "IMGCLF_FEATURES_IN_MEMORY_MB": limit}, cwd=ROOT, capture_output=True, timeout=120)
        hist.append([(float(r["val_loss"]), float(r["train_loss"])) for r in read_history(out / "history.csv")])
    assert len(hist[0]) == 6 and np.allclose(hist[0], hist[1], atol=1e-4)
