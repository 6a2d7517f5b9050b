"""A segmentation run's model.pt through PyTorch: the logits of a uint8
batch, resized to each original image before the argmax; the resize that
prepares an image and the answer are shared with other engines in
predictor.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.errors import ModelFileError
from imgclf.io import torch_load
from imgclf.runs import RunDir
from imgclf.tasks.segment.model import RECORD_KEYS, Segmenter, segmenter_from_record
from imgclf.tasks.segment.predictor import SegPredictor, resize_mask

# Logits are resized to the original image before the argmax, up to this many
# bytes (11 classes at 12 MP would take 530 MB); beyond it they are resized
# to the largest size that fits, and the label map to the original with
# nearest neighbour. The network sees the image at image_size, so the edges
# gain nothing from logits at more than about a megapixel.
MAX_LOGIT_BYTES = 64 << 20


class TorchSegPredictor(SegPredictor):
    def __init__(self, model: Segmenter, classes: list[str], image_size: int, device: str | torch.device = "cpu",
                 source: str = "model", metadata: dict | None = None):
        self.model, self.classes, self.image_size = model.eval().to(device), list(classes), int(image_size)
        self.device, self.source, self.metadata = torch.device(device), source, metadata or {}
        self.arch = f"{model.config['backbone']}+{model.config['decoder']}"

    @classmethod
    def from_run(cls, path: str | Path, device: str = "auto", **_) -> TorchSegPredictor:
        run = RunDir(path)
        rec = torch_load(run.require_model(), RECORD_KEYS)
        if rec.get("task") != "segment":
            raise ModelFileError(f"{run.model_file}: not a segmentation model",
                                 "give a run made by `imgclf train` on segmentation masks")
        if run.config_file.exists():
            run.check_one_run(rec.get("run_id"))
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        return cls(segmenter_from_record(rec), rec["classes"], rec["image_size"], dev, str(run.model_file),
                   {"best": rec.get("best", {}), "ignore_index": rec["ignore_index"]})

    def _logits(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255
        self.model.eval()
        return self.model(x)

    @torch.inference_mode()
    def outputs(self, batch: np.ndarray) -> np.ndarray:
        return self._logits(batch).argmax(1).to(torch.uint8).cpu().numpy()

    @torch.inference_mode()
    def label_maps(self, xs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Logits resized (bilinear) to each original size, then the argmax:
        sharper edges than resizing the label map."""
        out: list[np.ndarray | None] = [None] * len(xs)
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            by_shape.setdefault(x.shape, []).append(i)
        for idx in by_shape.values():
            logits = self._logits(np.stack([xs[i] for i in idx]))
            for i, lg in zip(idx, logits):
                w, h = sizes[i]
                size = logit_size(w, h, lg.shape[0])
                up = F.interpolate(lg[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                out[i] = resize_mask(up.argmax(0).to(torch.uint8).cpu().numpy(), (w, h))
        return out


def logit_size(width: int, height: int, num_classes: int) -> tuple[int, int]:
    """(h, w) to resize logits to before the argmax: the image's own size, or
    the largest of its aspect within MAX_LOGIT_BYTES (each side at least 1,
    so a thin strip keeps its length only as far as the budget allows)."""
    px = max(1, MAX_LOGIT_BYTES // (4 * num_classes))
    if width * height <= px:
        return height, width
    s = (px / (width * height)) ** 0.5
    w = max(1, round(width * s))
    h = max(1, min(round(height * s), px // w))
    return h, max(1, min(w, px // h))
