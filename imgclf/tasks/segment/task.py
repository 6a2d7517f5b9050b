"""segment: the task's verbs (see imgclf/tasks/__init__.py), over this
package's parts: masks (data.py, check.py), the network (model.py), the
recipe (train.py), scoring and the report (evaluate.py, metrics.py, report.py), the
answer (predictor.py, torch_predictor.py, onnx_predictor.py). Importing
it needs no torch: `imgclf predict x.onnx` takes these verbs too."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from imgclf.config import CheckConfig, TrainConfig
from imgclf.data.images import open_image
from imgclf.errors import ConfigError
from imgclf.io import atomic_write_bytes
from imgclf.log import get_logger
from imgclf.tasks.segment.check import check_dataset, format_report
from imgclf.tasks.segment.evaluate import evaluate, load_run  # noqa: F401 (evaluate: the verb)
from imgclf.tasks.segment.predictor import SegPredictor, mask_png, overlay

log = get_logger(__name__)


def train(cfg: TrainConfig) -> dict:
    from imgclf.tasks.segment.train import train as train_segmenter  # deferred: torch (predict x.onnx runs without)

    return train_segmenter(cfg)


def check(cfg: CheckConfig) -> tuple[dict, str]:
    rep = check_dataset(cfg.data, cfg.ignore_index, cfg.val_fraction, cfg.test_fraction, cfg.seed,
                        near_dup=cfg.near_dup, progress=True)
    return rep.to_dict(), format_report(rep)


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | None = None,
         threads: int | None = None) -> SegPredictor:
    return load_run(path, device)


def format_answers(results: list[dict], fmt: str) -> str:
    """`imgclf predict`'s output: JSON (the label map as a base64 palette
    PNG: its pixel values are the class ids), CSV (one row per image and
    class), or a table of pixel shares."""
    if fmt == "json":
        return json.dumps([{**{k: v for k, v in r.items() if k != "mask"},
                            **({"mask_png": base64.b64encode(mask_png(r["mask"], 256)).decode()}
                               if "mask" in r else {})} for r in results], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "class", "pixel_share", "error"])
        for r in results:
            for c, s in r.get("classes", {}).items():
                w.writerow([r.get("path", ""), c, f"{s:.6f}", ""])
            if "error" in r:
                w.writerow([r.get("path", ""), "", "", r["error"]])
        return buf.getvalue().rstrip("\n")
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r.get('path', '')}  ERROR {r['error']}")
            continue
        top = sorted(r["classes"].items(), key=lambda kv: -kv[1])
        lines.append(f"{r.get('path', '')}  {r['width']}x{r['height']}  " + "  ".join(f"{c} {s:.1%}" for c, s in top))
    return "\n".join(lines)


def save_masks(results: list[dict], classes: list[str], out: str | Path) -> int:
    """`predict --save-masks DIR`: per answered image OUT/<k>_<stem>.png (the
    label map: pixel values are class ids, a palette for viewers) and
    OUT/<k>_<stem>_overlay.jpg (the colours over the picture). Returns how many."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(Path(r["path"]).parent.resolve() == out.resolve() for r in results if "path" in r):
        raise ConfigError(f"--save-masks {out} is where the input images are", "choose another folder")
    n = 0
    for k, r in enumerate(results):
        if "mask" not in r or "path" not in r:
            continue
        stem = f"{k:05d}_{Path(r['path']).stem}"
        atomic_write_bytes(out / f"{stem}.png", mask_png(r["mask"], len(classes)))
        buf = io.BytesIO()
        overlay(open_image(r["path"]), r["mask"], len(classes)).save(buf, "JPEG", quality=90)
        atomic_write_bytes(out / f"{stem}_overlay.jpg", buf.getvalue())
        n += 1
    return n
