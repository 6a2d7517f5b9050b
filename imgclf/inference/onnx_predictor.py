"""An exported `.onnx` classifier as a Predictor, on onnxruntime alone: no torch.

`imgclf export` writes a graph that takes uint8 RGB images (N, S, S, 3) at the
model's input size and returns calibrated probabilities; normalisation and the
temperature are inside it, traced from the same functions PyTorch runs. What
is left outside is the resize, done by `Preprocess.load` exactly as in
training; class names and preprocessing come from the file's metadata, so the
file alone is enough for `imgclf predict` and `imgclf serve`.

This module must never import torch (tests/test_export.py checks it).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from imgclf.errors import ModelFileError, RunError
from imgclf.inference.predictor import Predictor
from imgclf.log import get_logger
from imgclf.ort import ort_session
from imgclf.runs import RunDir

log = get_logger(__name__)

FORMAT = "imgclf-onnx-1"  # metadata "format": what this reader understands
INPUT, OUTPUT = "images", "probs"
UNKNOWN_OUTPUT, REJECTED_OUTPUT = "unknown", "rejected"  # present when the run has an unknown-input scorer
SELECTED_OUTPUT = "selected"  # multi-label models: (N, C) bool, each label at or above its threshold
RESIZE_IN_GRAPH = "resize_in_graph"  # metadata key: "true" when `images` takes any size (deploy/resize_graph.py)


class OnnxPredictor(Predictor):
    def __init__(self, path: str | Path | bytes, threads: int | None = None, any_size: bool = False, session=None):
        """path: an .onnx file, or its bytes (the export checks a model before writing it).
        any_size: accept a model that resizes inside its graph (`export --any-size`,
        the web export), for a caller that feeds it decoded photos itself.
        session: the one already opened on path (`open_session`), not opened twice."""
        self.source = "<bytes>" if isinstance(path, bytes) else str(path)
        self.session = session or open_session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise ModelFileError(f"{self.source}: not an imgclf export (metadata format={meta.get('format')!r})",
                                 "export the run with `imgclf export RUN --format onnx`")
        if meta.get(RESIZE_IN_GRAPH) == "true" and not any_size:
            raise ModelFileError(f"{self.source}: this model resizes inside its graph (exported for apps with "
                                 "--any-size or --format web) and takes photos at their own size, so `imgclf "
                                 "predict`/`serve` cannot batch it", "use the plain export: `imgclf export RUN`")
        outs = {o.name: o.shape for o in self.session.get_outputs()}
        names = list(outs)
        if OUTPUT not in outs:
            raise ModelFileError(f"{self.source}: the graph has no {OUTPUT!r} output (it has {names[:5]})",
                                 "export the run with `imgclf export RUN --format onnx`")
        self._outputs = [OUTPUT, UNKNOWN_OUTPUT] if UNKNOWN_OUTPUT in names else [OUTPUT]
        self.read_export_metadata({k: _maybe_json(v) for k, v in meta.items()}, UNKNOWN_OUTPUT in names)
        width = (outs[OUTPUT] or [None])[-1]
        if isinstance(width, int) and width != len(self.classes):  # a symbolic width is checked by self_check
            raise ModelFileError(f"{self.source}: the graph scores {width} classes but its metadata names "
                                 f"{len(self.classes)}", "export the run again with `imgclf export RUN`")
        # One model call at a time: onnxruntime already uses every core inside a call.
        self._lock = threading.Lock()
        if not isinstance(path, bytes):
            warn_if_stale(self.metadata, path)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("arch", "?"))

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            out = self.session.run(self._outputs, {INPUT: np.ascontiguousarray(batch, dtype=np.uint8)})
        return out[0], (out[1] if self.has_unknown else None)


def open_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime session on an exported file, or a ModelFileError that says why not."""
    source = "<bytes>" if isinstance(path, bytes) else str(path)
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise RunError(f"{path}: no such model file", "write one with `imgclf export RUN --format onnx`")
    try:
        # The memory arena stays on here: it holds the peak of the batch shapes
        # seen (bounded by --max-batch), and serving without it was markedly
        # slower (bench/bench_soak.py).
        return ort_session(path, threads)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
        why = (str(e).strip().splitlines() or [""])[0][:300]  # e.g. external data it cannot find
        raise ModelFileError(f"{source}: not a loadable ONNX model ({type(e).__name__}: {why})",
                             "export it again with `imgclf export RUN` (one self-contained file)") from None


def warn_if_stale(meta: dict, path: str | Path) -> bool:
    """Warn when the run this file was exported from has a different model.pt
    now (retrained, or recalibrated): the export no longer matches it."""
    run_path, sha = meta.get("run_path"), meta.get("model_sha256")
    if not run_path or not sha:
        return False
    run = RunDir(run_path)
    if not run.model_file.is_file() or run.model_sha256() == sha:
        return False
    log.warning(f"warning: {path} was exported from {run.model_file}, which has changed since (retrained or "
                f"recalibrated); re-export it with `imgclf export {run.path}`")
    return True


def task_metadata(session, source: str, task: str, outputs: list[str]) -> tuple[dict, list[str]]:
    """A detection or segmentation export's metadata and class names, or a
    ModelFileError that says which part is wrong: its format and task, the
    graph's first outputs, the class list."""
    meta = {k: _maybe_json(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    what = {"detect": "detection", "segment": "segmentation"}.get(task, task)
    if meta.get("format") != FORMAT or meta.get("task") != task:
        raise ModelFileError(f"{source}: not an imgclf {what} export (metadata format={meta.get('format')!r}, "
                             f"task={meta.get('task')!r})", f"export a {what} run with `imgclf export RUN`")
    names = [o.name for o in session.get_outputs()]
    if names[:len(outputs)] != outputs:
        raise ModelFileError(f"{source}: the graph's outputs are {names[:len(outputs) + 2]}, not {outputs}",
                             "export the run again with `imgclf export RUN`")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelFileError(f"{source}: its metadata 'classes' must be a non-empty list of names",
                             "export the run again with `imgclf export RUN`")
    return meta, list(classes)


def _maybe_json(v: str):
    try:
        return json.loads(v)
    except (ValueError, TypeError):
        return v
