"""segment: the task's verbs (see imgclf/tasks/__init__.py), over this
package's parts: masks (data.py, check.py), the network (model.py), the
recipe (train.py), metrics and the report (metrics.py, report.py), the
answer (predictor.py, torch_predictor.py, onnx_predictor.py). Importing
it needs no torch: `imgclf predict x.onnx` takes these verbs too."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from pathlib import Path

from imgclf.config import CheckConfig, EvaluateConfig, TrainConfig
from imgclf.data.images import open_image
from imgclf.errors import ConfigError, DataError
from imgclf.inference.load import model_format
from imgclf.io import atomic_write_bytes, read_json, write_json
from imgclf.log import get_logger
from imgclf.runs import RunDir
from imgclf.tasks.segment.check import check_dataset, format_report
from imgclf.tasks.segment.data import SegDataset, read_dataset, remap_classes
from imgclf.tasks.segment.onnx_predictor import OnnxSegPredictor
from imgclf.tasks.segment.predictor import SegPredictor, mask_png, overlay
from imgclf.tasks.segment.report import write_seg_report

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
    from imgclf.tasks.segment.torch_predictor import TorchSegPredictor  # deferred: torch

    return TorchSegPredictor.from_run(path, device=device)


def evaluate(cfg: EvaluateConfig, pred: SegPredictor | None = None) -> dict:
    """A run on its held-out split (test, else val), or on every image of DATA
    (another dataset, classes matched by name): RUN/eval_<split>.json with
    miou, iou_per_class, pixel_accuracy, the confusion matrix; and the report.
    RUN may be an exported .onnx/.ort (results in <file>-eval/)."""
    run, saved_in, pred = _scored_by(cfg, pred)
    ignore = pred.metadata.get("ignore_index", 255)
    if cfg.data:
        ds = remap_classes(read_dataset(cfg.data, None, ignore, strict=False), pred.classes)
        items = [i for i, it in enumerate(ds.items) if cfg.split is None or it.split == cfg.split]
        split = cfg.split or "data"
    else:
        if not saved_in.splits_file.is_file():
            raise ConfigError(f"{cfg.run}: no DATA given, and no run (splits.json) beside it to take the held-out "
                              "split from", f"give the data: imgclf evaluate {cfg.run} DATA")
        saved = read_json(saved_in.splits_file)
        ds = read_dataset(saved["root"], saved["format"], saved["ignore_index"], strict=False)
        index = {str(it.image): i for i, it in enumerate(ds.items)}
        split = cfg.split or ("test" if saved["test"] else "val")
        items = [index[p] for p in saved[split] if p in index]
    if not items:
        raise DataError(f"{cfg.data or run}: no images to score{f' in split {split}' if cfg.split else ''}",
                        "give a dataset with images (or leave out --split to score all of them)")
    return evaluate_split(run, pred, ds, items, split, cfg.report)


def _scored_by(cfg: EvaluateConfig, pred: SegPredictor | None) -> tuple[RunDir, RunDir, SegPredictor]:
    """(where the results go, the run whose splits.json names the held-out
    split, the predictor). An exported .onnx/.ort scores on onnxruntime; its
    results go beside it, to <file>-eval/, never over its run's own."""
    path = Path(cfg.run)
    if pred is None and path.is_file() and model_format(path) in ("onnx", "ort"):
        return RunDir(path.with_name(path.name + "-eval")), RunDir(path.parent), OnnxSegPredictor(path)
    run = RunDir(cfg.run)
    return run, run, pred or load(run.path, cfg.device)


def evaluate_split(run: RunDir, pred: SegPredictor, ds: SegDataset, items: list[int], split: str,
                   report: bool = True) -> dict:
    from imgclf.tasks.segment.train import eval_json, evaluate_items  # deferred: torch (the recipe's module)

    t0 = time.time()
    m = evaluate_items(pred, ds, items, per_image=report)
    out = {**eval_json(m, split, ds), "run": str(run), "seconds": round(time.time() - t0, 2)}
    out.pop("loss", None)
    write_json(run.eval_file(split), out)
    log.info(f"{split}: mIoU {m['miou']:.3f}  pixel accuracy {m['pixel_accuracy']:.3f}  on {m['n']} images  "
             + "  ".join(f"{c} {v:.3f}" for c, v in m["iou_per_class"].items() if v is not None))
    if report:
        log.info(f"report: {write_seg_report(run, pred, ds, m, split)}")
    return out


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
