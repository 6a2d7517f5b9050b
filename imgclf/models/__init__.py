"""Models: a registry of small builders (registry.py), the frozen-backbone
feature extractor and cache (features.py) and the embedding service over
them (embedder.py). Every model's `forward` returns
logits; losses live in training/, temperatures in inference/."""

from __future__ import annotations

from imgclf.models.registry import (MODELS, ImageClassifier, build_model, count_params,  # noqa: F401
                                    get_model_info)


def resolve_device(name: str):
    """`auto` -> cuda when available, else cpu; a clear error for cuda without a GPU."""
    import torch

    from imgclf.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here", "use --device cpu")
    return torch.device(name)
