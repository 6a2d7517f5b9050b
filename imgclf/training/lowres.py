"""Low-resolution fine-tuning's recipe: linear probe, then fine-tuning (LP-FT).

A fresh random head fine-tuned together with a pretrained backbone pushes
large, noisy gradients into the backbone in the first steps and distorts the
features it was chosen for; on a few hundred small images that left the
fine-tuned network below the frozen features it started from
(docs/benchmarks.md, "small images"). Published practice (Kumar et al.,
"Fine-Tuning can Distort Pretrained Features", ICLR 2022; Keras's transfer
learning guide) first fits the head on the frozen features, then fine-tunes
every layer at a small learning rate with batch norm's running statistics
kept. Here the head is fitted exactly, as `linear` fits its own (head_fit.py:
cross-validated L-BFGS), on the frozen backbone's features of the upscaled
in-memory images, so fine-tuning starts from the probe's accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from imgclf.models.registry import ImageClassifier
from imgclf.training.head_fit import fit_head_cv


@torch.inference_mode()
def frozen_features(model: ImageClassifier, X: torch.Tensor, prepare, device: torch.device,
                    batch: int = 128) -> torch.Tensor:
    """The frozen backbone's pooled features of uint8 images in memory (eval mode), on the CPU."""
    was = model.training
    model.eval()
    out = torch.cat([model.backbone(prepare(X[i:i + batch].to(device))).float().cpu()
                     for i in range(0, len(X), batch)]) if len(X) else torch.zeros(0, model.num_features)
    model.train(was)
    return out


@dataclass
class Probe:
    acc: float  # cross-validated accuracy of the chosen L2 strength on X's features
    l2: float
    n: int
    seconds: float

    def __str__(self) -> str:
        return (f"head from the linear probe on {self.n} images' frozen features ({self.l2:.3g} L2, "
                f"cross-validated acc {self.acc:.4f}) in {self.seconds:.1f}s")


def probe_head(model: ImageClassifier, X: torch.Tensor, Y: torch.Tensor, prepare, device: torch.device,
               folds: int, seed: int) -> Probe | None:
    """Set the output layer to the cross-validated linear probe on the frozen
    features of X (upscaled by `prepare`); None (the head left as it is) when
    the head is not a single linear layer (--head-hidden) or Y is multi-label."""
    last = model.head[-1]
    if Y.ndim != 1 or not isinstance(last, torch.nn.Linear) or last.in_features != model.num_features:
        return None
    t0 = time.time()
    fit = fit_head_cv(frozen_features(model, X, prepare, device), Y.long(), 1, folds, seed)
    with torch.no_grad():
        last.weight.copy_(fit.weight.to(last.weight))
        last.bias.copy_(fit.bias.to(last.bias))
    return Probe(fit.cv[fit.l2]["acc"], fit.l2, len(X), time.time() - t0)
