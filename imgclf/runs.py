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
from pathlib import Path

from imgclf.data.datasets import Splits
from imgclf.errors import RunError
from imgclf.io import read_history, read_json, torch_load
from imgclf.models.records import RECORD_KEYS


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
        """The model record in model.pt (loaded safely: tensors and plain data only)."""
        return torch_load(self.require_model(), RECORD_KEYS)

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
