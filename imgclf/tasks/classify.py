"""classify: the task's verbs over the classification pipeline, which lives in
the layers below (data, training, evaluation, data_engine, inference). This
module only adapts them to the task registry's verbs (imgclf/tasks/__init__.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from imgclf.config import CheckConfig, EvaluateConfig, TrainConfig
from imgclf.data.check import format_report
from imgclf.data.check_fix import default_fix_path
from imgclf.inference import Predictor
from imgclf.inference import load as load_model

# The verbs that train, evaluate or check import torch when called: `predict`
# and `serve` of an exported model use this module without it.


def train(cfg: TrainConfig) -> object:
    from imgclf.training.train import train as train_classifier  # deferred: torch

    return train_classifier(cfg)


def evaluate(cfg: EvaluateConfig) -> dict:
    from imgclf.data_engine import REPORT_SECTIONS  # deferred: torch
    from imgclf.evaluation.evaluate import evaluate_run  # deferred: torch

    return evaluate_run(cfg, sections=REPORT_SECTIONS)


def check(cfg: CheckConfig) -> tuple[dict, str]:
    from imgclf.data_engine.near_dup import check_dataset  # deferred: torch

    fix = (cfg.fix_out or default_fix_path(cfg.data)) if cfg.fix else None
    r = check_dataset(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, near_dup=cfg.near_dup,
                      model=cfg.model, cache_dir=cfg.cache_dir, fix=fix, follow_links=cfg.follow_links,
                      max_drop=cfg.max_drop, force=cfg.force)
    return r, format_report(r)


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | None = None,
         threads: int | None = None) -> Predictor:
    return load_model(path, device=device, engine=engine, cache_dir=cache_dir, threads=threads)


def format_answers(results: list[dict], fmt: str) -> str:
    """`imgclf predict`'s output: JSON, CSV, or a table (one line per image)."""
    if fmt == "json":
        return json.dumps(results, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label", "score", "top", "unknown", "error"])
        for r in results:
            top = ";".join(f"{t['label']}:{t['score']:.4f}" for t in r.get("top", []))
            w.writerow([r["path"], r.get("label", ""), f"{r['score']:.4f}" if "score" in r else "", top,
                        f"{r['unknown']:.4f}" if "unknown" in r else "", r.get("error", "")])
        return buf.getvalue().rstrip("\n")
    wp = max(10, *(len(r["path"]) for r in results)) if results else 10
    lines = []
    for r in results:
        body = f"ERROR {r['error']}" if "error" in r else "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"])
        if "labels" in r and "error" not in r:  # multi-label: the decided set first
            body = f"[{r['label'] or 'none'}]  " + body
        if "unknown" in r:
            body = ("UNKNOWN  " if r["label"] == "unknown" else "") + body + f"  (unknown {r['unknown']:.2f})"
        lines.append(f"{r['path']:<{wp}}  {body}")
    return "\n".join(lines)
