"""The run directory: everything a later command needs, written atomically.

RUN/
  model.pt        best weights + architecture, classes, preprocessing, config, version
  last.pt         latest checkpoint for --resume (optimizer, schedule, early stopping)
  config.json     resolved TrainConfig
  splits.json     the exact train/val/test files (relative paths)
  history.csv     one row per epoch
  summary.json    strategy chosen, timings, skipped files
  eval_<split>.json  metrics

model.pt holds only tensors, numbers, strings, lists and dicts, so it loads
with torch.load(weights_only=True) and across imgclf versions: no pickled code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run dir is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def torch_save_atomic(obj, path: str | Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load(path: str | Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def write_history(path: str | Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_history(path: str | Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_file_path(run: str | Path) -> Path:
    """RUN dir -> RUN/model.pt; a .pt file is taken as is."""
    p = Path(run)
    if p.is_dir():
        p = p / "model.pt"
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: no trained model here. Train one with `imgclf train DATA --out {run}`"
            + (f", or resume an interrupted run with `imgclf train --resume --out {run}`" if (p.parent / 'last.pt').exists() else ""))
    return p


def make_model_record(model, model_name: str, classes: list[str], preprocess, config: dict,
                      temperature: float = 1.0, extra: dict | None = None) -> dict:
    from . import __version__

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
    from .models import build_model

    if rec.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"model file format {rec['format_version']} is newer than this imgclf understands; upgrade imgclf")
    m = build_model(rec["arch"], rec["num_classes"], pretrained=False,
                    head_hidden=tuple(rec.get("head_hidden") or ()), dropout=rec.get("dropout", 0.2))
    m.load_state_dict(rec["state_dict"])
    return m.eval()
