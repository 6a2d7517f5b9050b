"""The "unknown" score: how unlike the training images an input is.

Higher means less familiar. Candidate raw scores (bench/bench_unknown.py
compares them on real data):
  max prob    1 - the calibrated top probability (a 2-class model is confident
              about everything, so it barely separates ants from cats)
  energy      -T logsumexp(logits / T) (Liu et al., 2020)
  kNN         cosine distance from the image's backbone features to its k-th
              nearest training image (Sun et al., 2022)
  Mahalanobis to the nearest class mean, shared covariance (Lee et al., 2018)

The shipped score is kNN (k = KNN_K), turned into a percentile of the
validation images' own distances: unknown = 0.97 means "less familiar than 97%
of the known validation images". So `--reject auto` is a threshold of 0.95
(keeps 95% of known images) and a number reads the same way for any dataset.
(`imgclf.inference.top_k` applies the threshold; `reject_threshold` parses it.)
`UnknownScorer` is a torch module so the exported ONNX graph computes the same
score from the same tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imgclf.inference.neighbours import kth_distance

# k: on pair A of bench/bench_unknown.py (ants/bees known; used for choosing),
# k = 1 and 5 tie (AUROC 0.997); 5, because one mislabelled or duplicated
# training image can make k = 1 accept an outlier. Pair B is reported as measured.
KNN_K = 5
MAX_BANK = 4096  # training images kept for the search: 4096 x 1280 fp16 = 10 MB in model.pt


def normalise_bank(features: np.ndarray) -> torch.Tensor:
    f = torch.from_numpy(np.asarray(features, dtype=np.float32))
    return nn.functional.normalize(f, dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and a shared Ledoit-Wolf precision matrix."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, np.float64)
    means = np.stack([f[labels == c].mean(0) if (labels == c).any() else f.mean(0) for c in range(num_classes)])
    prec = LedoitWolf().fit(f - means[labels]).precision_
    return torch.from_numpy(means).float(), torch.from_numpy(prec).float()


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    d = features.float()[:, None, :] - means[None]
    return torch.einsum("ncd,de,nce->nc", d, precision, d).min(1).values


class UnknownScorer(nn.Module):
    """features (N, D) -> unknown score (N,) in [0, 1]: the share of known
    validation images whose kNN distance is smaller than this image's."""

    def __init__(self, bank: torch.Tensor, val_distances: torch.Tensor, k: int = KNN_K):
        super().__init__()
        self.k = k
        self.register_buffer("bank", bank.half())  # fp16 halves the size; distances move < 1e-3
        self.register_buffer("val_sorted", val_distances.float().sort().values)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = kth_distance(features, self.bank, self.k)
        return (d[:, None] > self.val_sorted[None]).float().mean(1)

    def to_record(self) -> dict:
        return {"method": "knn", "k": self.k, "bank": self.bank.cpu(), "val_sorted": self.val_sorted.cpu()}

    @classmethod
    def from_record(cls, d: dict) -> UnknownScorer:
        return cls(d["bank"], d["val_sorted"], int(d["k"]))


def bank_sample(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of the kNN bank: every image, or at most MAX_BANK drawn evenly
    from each class (so training picks the images before encoding them)."""
    idx = np.arange(len(labels))
    if len(idx) > MAX_BANK:
        rng = np.random.default_rng(seed)
        classes = np.unique(labels)
        per = MAX_BANK // len(classes)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]))
    return idx


def fit_scorer(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
               seed: int = 0) -> UnknownScorer:
    """The kNN bank from (at most MAX_BANK, class-balanced) training features;
    the percentile scale from the validation images' distances to it."""
    bank = normalise_bank(train_features[bank_sample(np.asarray(train_labels), seed)])
    val = kth_distance(torch.from_numpy(np.asarray(val_features, np.float32)), bank.half(), KNN_K)
    return UnknownScorer(bank, val)
