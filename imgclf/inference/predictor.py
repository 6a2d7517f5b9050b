"""The Predictor contract every engine implements, and the one answer format.

    Predictor.prepare(src)  -> uint8 (S, S, 3)   Preprocess.load: the training resize
    Predictor.outputs(batch) -> (N, C) calibrated probabilities, (N,) unknown scores (or None)
    top_k(p, classes, k, unknown, reject) -> {"label", "score", "top", "unknown"}

No torch here: the .onnx and .tflite predictors derive from it.
"""


from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from imgclf.data import UNKNOWN
from imgclf.data.images import MAX_PIXELS, BadImage, Source, list_files
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ConfigError, ModelFileError
from imgclf.inference.batches import as_inputs, blank_answers, prepared_batches

AUTO_KEEP = 0.95  # --reject auto: keep this share of the known validation images


def top_k(p: np.ndarray, classes: list[str], k: int, unknown: float | None = None,
          reject: float | None = None, thresholds: np.ndarray | None = None) -> dict:
    """One image's answer: the best label, its score and the k best labels;
    with an unknown score, that score, and the label "unknown" (scored by it)
    when it is above the rejection threshold. Multi-label (`thresholds`
    given): "labels" lists every label at or above its threshold, best first
    (possibly none), and "label" is them joined by ";" as in the training CSV."""
    order = np.argsort(-p, kind="stable")[:max(1, min(k, len(classes)))]
    out = {"label": classes[order[0]], "score": float(p[order[0]]),
           "top": [{"label": classes[j], "score": float(p[j])} for j in order]}
    if thresholds is not None:
        on = [j for j in np.argsort(-p, kind="stable") if p[j] >= thresholds[j]]
        out["labels"] = [{"label": classes[j], "score": float(p[j])} for j in on]
        out["label"] = ";".join(classes[j] for j in on)
    if unknown is not None:
        out["unknown"] = float(unknown)
        if reject is not None and unknown > reject:
            out["label"], out["score"] = UNKNOWN, float(unknown)
            if thresholds is not None:
                out["labels"] = []
    return out


def reject_threshold(setting: str | float | None, stored: float | None) -> float | None:
    """--reject: "auto" keeps AUTO_KEEP of known validation images, a number
    in (0, 1] is the threshold on the unknown score, "off" disables; None
    keeps the model's stored setting (chosen at training time)."""

    if setting is None or setting == "":
        return stored
    if str(setting) == "off":
        return None
    if str(setting) == "auto":
        return AUTO_KEEP
    try:
        t = float(setting)
    except ValueError:
        t = -1.0
    if not 0 < t <= 1:
        raise ConfigError(f"--reject {setting!r} is not auto, off or a number in (0, 1]",
                          "e.g. --reject auto (keeps 95% of known images) or --reject 0.99")
    return t


class Predictor:
    """Shared by both engines: batching, bad inputs, the answer format."""

    classes: list[str]
    preprocess: Preprocess
    temperature: float
    arch: str
    source: str
    metadata: dict  # what /v1/model shows: metrics, versions, export provenance
    has_unknown: bool = False  # the model carries an unknown-input scorer
    multi_label: bool = False  # sigmoid scores per label, decided by `thresholds`
    thresholds: np.ndarray | None = None  # multi-label: per-label decision thresholds
    reject: float | None = None  # unknown scores above this answer "unknown"; None: never

    def prepare(self, src: Source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """Any image source -> uint8 (S, S, 3) as the model was trained; raises BadImage."""
        return self.preprocess.load(src, max_pixels)

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, S, S, 3) -> (N, C) calibrated probabilities and (N,)
        unknown scores in [0, 1] (None for a model without a scorer)."""
        raise NotImplementedError

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)[0]

    def set_reject(self, setting: str | float | None) -> None:
        """Override the stored rejection threshold (--reject at predict/serve time)."""
        if setting not in (None, "", "off") and not self.has_unknown:
            raise ConfigError(f"--reject {setting}: {self.source} has no unknown-input scorer",
                              "retrain it with this imgclf version (every new run has one), or drop --reject")
        self.reject = reject_threshold(setting, self.reject)

    def read_export_metadata(self, meta: dict, has_unknown: bool) -> None:
        """An exported file's metadata (.onnx, .ort, .tflite): classes, the
        preprocessing, the temperature, INT8, and the decisions its graph was
        exported with (the rejection threshold, multi-label thresholds)."""
        classes = meta.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise ModelFileError(f"{getattr(self, 'source', 'the model')}: its metadata 'classes' must be a non-empty "
                                 f"list of names, got {str(classes)[:60]!r}", "export the run again with "
                                 "`imgclf export RUN`")
        self.metadata = meta
        self.classes = list(classes)
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.temperature = float(meta.get("temperature", 1.0))
        self.int8 = bool(meta.get("int8", False))
        self.has_unknown = has_unknown
        self.reject = meta.get("reject") if has_unknown else None
        self.multi_label = bool(meta.get("multi_label", False))
        th = meta.get("thresholds")
        self.thresholds = np.asarray(th, np.float32) if th else None

    def warm_up(self) -> None:
        """Build whatever the first call would (a server calls this before it says ready)."""

    def self_check(self) -> None:
        """One real inference on a blank image. A crafted or damaged model whose
        graph fails at run time, or scores another number of classes than its
        metadata names (which would silently mislabel), is refused here, at
        load, rather than failing or lying on every request."""
        name, s = getattr(self, "source", "the model"), self.preprocess.size
        try:
            p, _ = self.outputs(np.zeros((1, s, s, 3), np.uint8))
        except Exception as e:  # any runtime's own error types
            raise ModelFileError(f"{name}: the model fails on a blank {s}x{s} image ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                                 "export the run again with `imgclf export RUN`") from None
        if np.shape(p) != (1, len(self.classes)) or not np.all(np.isfinite(p)):
            raise ModelFileError(f"{name}: the model answers scores of shape {tuple(np.shape(p))} for one image, "
                                 f"but its metadata names {len(self.classes)} classes (or they are not finite)",
                                 "export the run again with `imgclf export RUN`; never edit an export's metadata")

    def predict(self, inputs, top_k: int = 5, batch_size: int = 32, raw: bool = False) -> list[dict]:
        """Top-k labels for each input (a path, bytes, PIL image, HxWx3 array,
        or a list of them). A bad input gives {"error": reason} in its place
        instead of failing the batch; raw=True adds the whole "probs" vector."""
        inputs = as_inputs(inputs)
        out = blank_answers(inputs)
        for ids, xs in prepared_batches(inputs, self.prepare, batch_size, out):
            ps, us = self.outputs(np.stack(xs))
            for j, (i, p) in enumerate(zip(ids, ps)):
                out[i].update(_top_k(p, self.classes, top_k, None if us is None else us[j], self.reject,
                                     self.thresholds if self.multi_label else None))
                if raw:
                    out[i]["probs"] = p
        return out

    def predict_proba(self, inputs, batch_size: int = 32) -> np.ndarray:
        """(N, C) probabilities; raises BadImage on the first unreadable input."""
        results = self.predict(inputs, top_k=1, batch_size=batch_size, raw=True)
        for r in results:
            if "error" in r:
                raise BadImage(r.get("path", "<input>"), r["error"])
        return np.stack([r["probs"] for r in results])


_top_k = top_k  # `predict`'s parameter shadows the function's name


def expand_paths(paths: Iterable[str | Path]) -> list[str]:
    """Files as given; folders expanded to every file inside (sorted)."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        out += [str(f) for f in list_files(p)] if p.is_dir() else [str(p)]
    return out
