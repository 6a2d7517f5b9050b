"""Model records: what model.pt holds (architecture, classes, preprocessing,
config, temperature, weights) and how the network is rebuilt from one.

A record holds only tensors, numbers, strings, lists and dicts, so it loads
with torch.load(weights_only=True) and across imgclf versions: no pickled code.
This module imports no torch at module level (RunDir checks RECORD_KEYS on the
serving path); rebuilding a network needs the registry, hence torch.
"""

from __future__ import annotations

from imgclf._version import __version__
from imgclf.errors import ModelFileError

FORMAT_VERSION = 1
RECORD_KEYS = ("arch", "classes", "num_classes", "preprocess", "state_dict")


def make_model_record(model, model_name: str, classes: list[str], preprocess, config: dict,
                      temperature: float = 1.0, extra: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "imgclf_version": __version__,
        "arch": model_name,
        "num_classes": len(classes),
        "num_features": model.num_features,
        "head_hidden": list(config.get("head_hidden") or []),
        "dropout": config.get("dropout", 0.2),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "temperature": float(temperature),
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }


def model_from_record(rec: dict):
    """Rebuild the network from a model record (no pretrained download: the
    record's own weights replace them)."""
    from imgclf.models.registry import build_model, record_arch  # deferred: torch (see the module doc)

    if rec.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"model file format {rec['format_version']} is newer than this imgclf understands",
                             "upgrade imgclf (pip install -U imgclf)")
    m = build_model(record_arch(rec["arch"], rec["state_dict"]), rec["num_classes"], pretrained=False,
                    head_hidden=tuple(rec.get("head_hidden") or ()), dropout=rec.get("dropout", 0.2))
    try:
        m.load_state_dict(rec["state_dict"])
    except RuntimeError as e:
        raise ModelFileError(f"the model file's weights do not fit a {rec['arch']} ({str(e).splitlines()[0]})",
                             "the file is damaged or was edited; train again") from None
    return m.eval()
