"""Instance masks: a mask per detected object, Mask R-CNN's way on this
detector's pyramid. RoIAlign (14 x 14) on P3-P5 at each box, four 3x3
convolutions, a 2x up-convolution and one 28 x 28 logit map per class
(torchvision's MaskRCNNHeads and MaskRCNNPredictor); the loss is
torchvision's `maskrcnn_loss` (per-pixel BCE on the box's own class against
the truth mask cropped to the box). Trained on the true boxes (Mask R-CNN
trains on positive proposals, of which they are the best), applied at
inference to the detected boxes.

Truth comes from instance-id PNGs (0 background, k the k-th object, as
Penn-Fudan's PedMasks): `id_map` letterboxes one with nearest-neighbour, so
ids never blend. Pasting a mask back into the original pixels and its COCO
RLE are the answer's (predictor.py, torch-free).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign

from imgclf.data.preprocess import pad_geometry

RESOLUTION = 28  # the mask's side in the box: Mask R-CNN's


class MaskBranch(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=14, sampling_ratio=2)
        self.convs = MaskRCNNHeads(channels, (channels,) * 4, 1)
        self.logits = MaskRCNNPredictor(channels, channels, num_classes)

    def forward(self, pyramid: list[torch.Tensor], boxes: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(R, num_classes, 28, 28) logits for the boxes (input pixels) of each image."""
        feats = OrderedDict((str(i), f) for i, f in enumerate(pyramid[:3]))
        return self.logits(self.convs(self.pool(feats, boxes, [tuple(size)] * len(boxes))))


def mask_loss(branch: MaskBranch, pyramid: list[torch.Tensor], size: tuple[int, int],
              targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """BCE of the masks at the true boxes; targets carry "masks" (N, S, S) 0/1."""
    boxes = [t["boxes"] for t in targets]
    if sum(len(b) for b in boxes) == 0:
        return sum(p.sum() for p in branch.parameters()) * 0
    logits = branch(pyramid, boxes, size)
    idx = [torch.arange(len(b), device=b.device) for b in boxes]
    return maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], [t["labels"] for t in targets], idx)


def id_map(mask_path, size: int) -> np.ndarray:
    """An instance-id PNG letterboxed to (size, size) as the image is (nearest: ids never blend)."""
    m = Image.open(mask_path)
    w, h = m.size
    nw, nh, left, top = pad_geometry(w, h, size)
    out = np.zeros((size, size), np.uint8)
    out[top:top + nh, left:left + nw] = np.asarray(m.resize((nw, nh), Image.NEAREST), np.uint8)
    return out


def instance_masks(ids: np.ndarray, count: int) -> torch.Tensor:
    """(count, S, S) 0/1 masks: instance k is the k-th smallest id (as read_masks orders the boxes)."""
    uniq = np.unique(ids[ids > 0])[:count]
    out = np.zeros((count, *ids.shape), np.uint8)
    for k, u in enumerate(uniq):
        out[k] = ids == u
    return torch.from_numpy(out)
