"""detect: the task's verbs (see imgclf/tasks/__init__.py), over this
package's parts: labels (data.py, formats/, check.py), the network (model.py), the
recipe (train.py), metrics and the report (evaluate.py, report.py), the
answer (predictor.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import ImageDraw

from imgclf.config import CheckConfig, EvaluateConfig, TrainConfig
from imgclf.data.images import open_image
from imgclf.errors import ConfigError
from imgclf.io import atomic_write_bytes
from imgclf.tasks.detect.check import check_dataset, fix_dataset, format_report
from imgclf.tasks.detect.predictor import DetPredictor

# An answer's boxes drawn in these colours, one per class in turn.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


# The verbs that run the network import torch when called: `predict` and
# `serve` of an exported detector use this module without it.

def train(cfg: TrainConfig) -> dict:
    from imgclf.tasks.detect.train import train as train_detector  # deferred: torch

    return train_detector(cfg)


def evaluate(cfg: EvaluateConfig) -> dict:
    from imgclf.tasks.detect.evaluate import evaluate as evaluate_run  # deferred: torch

    return evaluate_run(cfg)


def check(cfg: CheckConfig) -> tuple[dict, str]:
    near_dup = "hash" if cfg.near_dup == "auto" else cfg.near_dup  # auto: embeddings are classification's
    rep = check_dataset(cfg.data, cfg.image_size, near_dup, cfg.val_fraction, cfg.test_fraction, cfg.seed,
                        progress=True)
    out = rep.to_dict()
    text = format_report(rep)
    if cfg.fix:
        dest = Path(cfg.fix_out or Path(cfg.data).resolve().parent / f"{Path(cfg.data).resolve().name}_clean.json")
        out["fix"] = {"file": str(dest), **fix_dataset(cfg.data, dest)}
        text += "\nfixed copy -> " + str(dest) + ": " + ", ".join(f"{k} {v}" for k, v in out["fix"].items()
                                                                    if k != "file")
    return out, text


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | None = None,
         threads: int | None = None) -> DetPredictor:
    from imgclf.tasks.detect.torch_predictor import TorchDetPredictor  # deferred: torch

    return TorchDetPredictor.from_run(path, device=device)


def format_answers(results: list[dict], fmt: str) -> str:
    """`imgclf predict`'s output: JSON, CSV (one row per box), or a table."""
    if fmt == "json":
        return json.dumps(results, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label", "score", "x1", "y1", "x2", "y2", "error"])
        for r in results:
            for b in r.get("boxes", []):
                w.writerow([r.get("path", ""), b["label"], f"{b['score']:.4f}", *b["box"], ""])
            if "error" in r:
                w.writerow([r.get("path", ""), "", "", "", "", "", "", r["error"]])
        return buf.getvalue().rstrip("\n")
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r.get('path', '')}  ERROR {r['error']}")
            continue
        counts: dict[str, int] = {}
        for b in r["boxes"]:
            counts[b["label"]] = counts.get(b["label"], 0) + 1
        lines.append(f"{r.get('path', '')}  {len(r['boxes'])} boxes" + (": " if counts else "")
                     + ", ".join(f"{n} {c}" for c, n in counts.items()))
    return "\n".join(lines)


def save_images(results: list[dict], classes: list[str], out: str | Path) -> int:
    """Each answered image with its boxes drawn, as OUT/<name>.jpg; returns how many."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(p.resolve() == out.resolve() for r in results if "path" in r for p in [Path(r["path"]).parent]):
        raise ConfigError(f"--save-images {out} is where the input images are", "choose another folder")
    n = 0
    for k, r in enumerate(results):
        if "boxes" not in r or "path" not in r:
            continue
        img = open_image(r["path"])
        draw = ImageDraw.Draw(img)
        for b in r["boxes"]:
            colour = PALETTE[classes.index(b["label"]) % len(PALETTE)] if b["label"] in classes else PALETTE[0]
            draw.rectangle(b["box"], outline=colour, width=max(2, img.width // 300))
            draw.text((b["box"][0] + 3, b["box"][1] + 2), f"{b['label']} {b['score']:.2f}", fill=colour)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        atomic_write_bytes(out / f"{k:05d}_{Path(r['path']).stem}.jpg", buf.getvalue())
        n += 1
    return n

