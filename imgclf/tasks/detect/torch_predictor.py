"""A detection run's model.pt through PyTorch: the network's boxes for a
uint8 batch, everything else (letterbox, thresholds, the answer) shared with
the exported engines in predictor.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgclf.data.preprocess import Preprocess
from imgclf.errors import ModelFileError
from imgclf.io import torch_load
from imgclf.runs import RunDir
from imgclf.tasks.detect.model import RECORD_KEYS, Detector, detector_from_record
from imgclf.tasks.detect.predictor import DetPredictor

CANDIDATE_SCORE = 0.05  # what NMS keeps: the per-class thresholds (or --conf) cut from these


class TorchDetPredictor(DetPredictor):
    def __init__(self, model: Detector, classes: list[str], preprocess: Preprocess, thresholds,
                 device: str | torch.device = "cpu", source: str = "model", metadata: dict | None = None):
        self.model, self.classes, self.preprocess = model.eval().to(device), list(classes), preprocess
        self.thresholds = np.asarray(thresholds, np.float32)
        self.device, self.source, self.metadata = torch.device(device), source, metadata or {}
        self.arch = f"{model.config['backbone']}+{model.config['head']}"

    @classmethod
    def from_run(cls, path: str | Path, device: str = "auto", **_) -> TorchDetPredictor:
        run = RunDir(path)
        rec = torch_load(run.require_model(), RECORD_KEYS)
        if rec.get("task") != "detect":
            raise ModelFileError(f"{run.model_file}: not a detection model", "give a run made by `imgclf train` on "
                                 "detection labels")
        if run.config_file.exists():
            run.check_one_run(rec.get("run_id"))
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        return cls(detector_from_record(rec), rec["classes"], Preprocess.from_dict(rec["preprocess"]),
                   rec["thresholds"], dev, str(run.model_file), {"best": rec.get("best", {})})

    @torch.inference_mode()
    def outputs(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255
        return [tuple(d[k].float().cpu().numpy() if k == "masks" else d[k].cpu().numpy()
                      for k in ("boxes", "scores", "labels", "masks") if k in d)
                for d in self.model.predict(x, CANDIDATE_SCORE)]
