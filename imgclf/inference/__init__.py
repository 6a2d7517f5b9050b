"""One inference path for every command.

    Predictor.prepare(src)  -> uint8 (S, S, 3)   Preprocess.load: the training resize
    Predictor.outputs(batch) -> (N, C) calibrated probabilities, (N,) unknown scores (or None)
    top_k(p, classes, k, unknown, reject) -> {"label", "score", "top", "unknown"}   the one answer format

predictor.py holds the contract and the answer; load.py opens any model file
by its content. `TorchPredictor` (a run directory or model.pt) and
`OnnxPredictor` / `LiteRTPredictor` (exports, no torch) implement `outputs`;
everything above it is shared, so `imgclf.load`, `predict`, `evaluate`, the
export parity check and `serve` give the same probabilities for the same
image. The temperature is applied in exactly one function,
`torch_predictor.calibrated_probs`, which the exported graph is traced from.
"""

from imgclf.inference.load import load, model_format
from imgclf.inference.predictor import AUTO_KEEP, UNKNOWN, Predictor, expand_paths, reject_threshold, top_k

__all__ = ["AUTO_KEEP", "UNKNOWN", "Predictor", "expand_paths", "load", "model_format", "reject_threshold", "top_k"]
