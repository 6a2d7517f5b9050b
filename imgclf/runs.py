"""The run directory: everything a later command needs, read through one
object, `RunDir`, which owns every artifact name (files are written through
imgclf.io's atomic writers).

RUN/
  model.pt        best weights + architecture, classes, preprocessing, config,
                  temperature (fitted on val at the end of training), version
  last.pt         latest checkpoint for --resume (optimizer, schedule, early stopping)
  config.json     resolved TrainConfig
  splits.json     the exact train/val/test files (relative paths)
  history.csv     one row per epoch
  summary.json    strategy chosen, timings, calibration, skipped files
  eval_<split>.json         metrics;  predictions_<split>.csv: per-image probabilities
  report/         index.html and eval.json
  model.onnx, model.int8.onnx, model.ort, model.torchscript.pt, model.tflite, ...   exports (they record model.pt's hash)
  web/            `export --format web`: a static site that classifies in the browser
  similar.npz     training images' embeddings and thumbnails for `similar` and /v1/similar
                  (built on first use, rebuilt when model.pt changes); similar.usearch: its
                  HNSW graph, from 100,000 training images on

model.pt holds only tensors, numbers, strings, lists and dicts, so it loads
with torch.load(weights_only=True) and across imgclf versions: no pickled code.
This module imports no torch at module level: the .onnx path uses RunDir too.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from imgclf.data.datasets import Splits
from imgclf.errors import RunError
from imgclf.io import UMASK, read_history, read_json, torch_load, write_error
from imgclf.models.records import RECORD_KEYS


class RunLock:
    """One writer per run directory: `imgclf train` holds RUN/.imgclf.lock
    (an flock, which the kernel releases when the process ends, however it
    ends) for as long as it writes the run. A second run refuses, naming the
    holder (pid, host, start time); a lock file left by a run that died is
    taken over, with a note (`took_over`)."""

    NAME = ".imgclf.lock"

    def __init__(self, folder: str | Path, run_id: str = ""):
        self.folder, self.run_id, self.fd, self.took_over = Path(folder), run_id, None, ""

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        path = self.folder / self.NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666 & ~UMASK)
        except OSError as e:
            raise write_error(path, e) from None
        holder = _lock_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"{self.folder} is being written by another imgclf run ({_describe_holder(holder)})",
                           "wait for it to finish, or give this run another --out") from None
        if holder:
            self.took_over = (f"took over the lock of an earlier run that stopped without releasing it "
                              f"({_describe_holder(holder)})")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "run_id": self.run_id}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly
            os.close(self.fd)  # releases the flock
            self.fd = None


def _lock_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe_holder(h: dict) -> str:
    return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}" if h
            else "its pid, host and start time are not recorded yet")


class RunDir:
    """A run directory: its artifact names and the questions every command asks.

    Accepts RUN or RUN/model.pt (or any .pt inside RUN)."""

    MODEL, LAST, CONFIG, SPLITS = "model.pt", "last.pt", "config.json", "splits.json"
    HISTORY, SUMMARY, REPORT, SEARCH = "history.csv", "summary.json", "report", "search.csv"
    SIMILAR, SIMILAR_GRAPH = "similar.npz", "similar.usearch"
    EXPORTS = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "ort": "model.ort", "ort-int8": "model.int8.ort",
               "torchscript": "model.torchscript.pt", "tflite": "model.tflite", "tflite-int8": "model.int8.tflite",
               "web": "web"}

    def __init__(self, path: str | Path):
        p = Path(path)
        self.path = p.parent if p.suffix == ".pt" else p
        self.model_file = p if p.suffix == ".pt" else p / self.MODEL

    last_file = property(lambda self: self.path / self.LAST)
    config_file = property(lambda self: self.path / self.CONFIG)
    splits_file = property(lambda self: self.path / self.SPLITS)
    history_file = property(lambda self: self.path / self.HISTORY)
    summary_file = property(lambda self: self.path / self.SUMMARY)
    search_file = property(lambda self: self.path / self.SEARCH)
    report_dir = property(lambda self: self.path / self.REPORT)
    similar_file = property(lambda self: self.path / self.SIMILAR)
    similar_graph_file = property(lambda self: self.path / self.SIMILAR_GRAPH)
    report_page = property(lambda self: self.path / self.REPORT / "index.html")
    report_json = property(lambda self: self.path / self.REPORT / "eval.json")

    def eval_file(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def predictions_file(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def export_file(self, fmt: str, int8: bool = False) -> Path:
        return self.path / self.EXPORTS[fmt + ("-int8" if int8 else "")]

    def __str__(self) -> str:
        return str(self.path)

    # ---- questions
    def require_model(self) -> Path:
        """model.pt, or an error that says how to make one."""
        if not self.model_file.exists():
            fix = f"train one with `imgclf train DATA --out {self.path}`"
            if self.last_file.exists():
                fix += f", or resume the interrupted run with `imgclf train --resume --out {self.path}`"
            raise RunError(f"{self.model_file}: no trained model here", fix)
        return self.model_file

    def record(self) -> dict:
        """The model record in model.pt (loaded safely: tensors and plain data only),
        checked to belong to the same run as config.json and splits.json."""
        rec = torch_load(self.require_model(), RECORD_KEYS)
        self.check_one_run(rec.get("run_id"))
        return rec

    def check_one_run(self, model_id: str | None) -> None:
        """model.pt, config.json and splits.json carry the id of the run that
        wrote them; files of two runs in one folder (two trainings writing one
        --out, a copy mixed by hand) are refused rather than scored wrongly.
        Runs from before ids existed have none and pass."""
        ids = {self.MODEL: model_id}
        for f in (self.config_file, self.splits_file):
            try:
                ids[f.name] = read_json(f).get("run_id") if f.exists() else None
            except (OSError, ValueError, AttributeError):
                ids[f.name] = None
        known = {k: v for k, v in ids.items() if v}
        if len(set(known.values())) > 1:
            raise RunError(f"{self.path} mixes files of different runs (" + ", ".join(
                f"{k}: run {v}" for k, v in known.items()) + "), as when two trainings wrote one --out",
                f"train again into a new folder (imgclf train DATA --out NEW), or delete {self.path}")

    def model_sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.require_model(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def splits(self, root: str | None = None):
        """The exact files of each split (Splits), optionally under another data root."""
        if not self.splits_file.exists():
            raise RunError(f"{self.splits_file} is missing", "use the run directory that `imgclf train` wrote")
        return Splits.from_dict(read_json(self.splits_file), root=root)

    def held_out_split(self) -> str:
        """Where headline metrics come from: test if the data has one, else val."""
        if self.splits_file.exists():
            return self.splits().held_out
        found = sorted(self.path.glob("eval_*.json"))
        if found:
            return found[0].stem.removeprefix("eval_")

        raise RunError(f"{self.path}: no splits.json and no eval_*.json",
                       "is this a run directory (imgclf train DATA --out RUN)?")

    def selection_split(self) -> str:
        """The split choices (epoch, temperature) are made on: val, else test."""
        d = read_json(self.splits_file)
        return "val" if d.get("val") else "test"

    def metrics(self, split: str | None = None) -> dict:
        f = self.eval_file(split or self.held_out_split())
        return read_json(f) if f.exists() else {}

    def headline_metrics(self) -> dict:
        """The held-out accuracy a deployment shows (/v1/model, export metadata):
        the held-out split of the run's own data, never another folder's."""
        try:
            split = self.held_out_split()
        except FileNotFoundError:  # not a run directory (RunError)
            return {}
        m = self.metrics(split)
        if not m or (self.splits_file.exists() and m.get("data") != self.splits().root):
            return {}
        return {"split": split, "n": m.get("n"), "accuracy": m.get("accuracy"),
                "balanced_accuracy": m.get("balanced_accuracy")}

    def history(self) -> list[dict]:
        return read_history(self.history_file)

    def summary(self) -> dict:
        return read_json(self.summary_file) if self.summary_file.exists() else {}
