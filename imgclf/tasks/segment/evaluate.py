"""segment: scoring a predictor (a run's PyTorch model or an exported
.onnx/.ort) on held-out masks: each image whole, against its mask at the
mask's own resolution, through the same `segment()` answer that `predict`
and `serve` give. Torch-free, so `imgclf evaluate x.onnx` runs without it;
training's validation goes through `evaluate_items` too."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from imgclf.config import EvaluateConfig
from imgclf.errors import ConfigError, DataError
from imgclf.inference.load import model_format
from imgclf.io import read_json, write_json
from imgclf.log import get_logger
from imgclf.runs import RunDir
from imgclf.tasks.segment.data import SegDataset, load_mask, read_dataset, remap_classes
from imgclf.tasks.segment.metrics import confusion, scores
from imgclf.tasks.segment.onnx_predictor import OnnxSegPredictor
from imgclf.tasks.segment.predictor import SegPredictor, resize_mask
from imgclf.tasks.segment.report import write_seg_report

log = get_logger(__name__)


def load_run(path: str | Path, device: str = "auto") -> SegPredictor:
    from imgclf.tasks.segment.torch_predictor import TorchSegPredictor  # deferred: torch (x.onnx scores without)

    return TorchSegPredictor.from_run(path, device=device)


def evaluate_items(pred: SegPredictor, ds: SegDataset, items: list[int], batch_size: int = 8,
                   per_image: bool = False) -> dict:
    """Scores of the predictor on ds's `items`, each image whole, against its
    mask at the mask's own resolution: the path `predict` answers through."""
    k, cm, worst, bad = len(ds.classes), np.zeros((len(ds.classes),) * 2, np.int64), [], []
    for start in range(0, len(items), batch_size):  # a batch at a time: any dataset size fits in memory
        batch = items[start:start + batch_size]
        masks = [load_mask(ds, ds.items[i]) for i in batch]
        answers = pred.segment([str(ds.items[i].image) for i in batch], batch_size)
        for i, m, a in zip(batch, masks, answers):
            if "error" in a:
                bad.append({"path": str(ds.items[i].image), "reason": a["error"]})
                continue
            c = confusion(m, resize_mask(a["mask"], (m.shape[1], m.shape[0])), k, ds.ignore_index)
            cm += c
            if per_image:
                worst.append((scores(c, ds.classes)["miou"], i))
    out = scores(cm, ds.classes)
    out["n"], out["skipped_files"] = len(items) - len(bad), bad
    out["loss"] = 1.0 - out["pixel_accuracy"]  # EarlyStopping breaks mIoU ties on its "loss": the pixel error
    if per_image:
        out["per_image_miou"] = sorted(worst)
    return out


def eval_json(m: dict, split: str, ds: SegDataset) -> dict:
    return {"task": "segment", "split": split, "data": str(ds.root), "ignore_index": ds.ignore_index,
            **{k: v for k, v in m.items() if k != "per_image_miou"}}


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
    return run, run, pred or load_run(run.path, cfg.device)


def evaluate_split(run: RunDir, pred: SegPredictor, ds: SegDataset, items: list[int], split: str,
                   report: bool = True) -> dict:
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
