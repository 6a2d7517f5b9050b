"""`imgclf compare RUN1 RUN2 ...`: several runs side by side on the same split.

Reads each run's RUN/eval_<split>.json (written by training and by
`imgclf evaluate`); a run without one is evaluated first (without touching its
temperature or writing a report)."""

from __future__ import annotations

from pathlib import Path

from imgclf.config import CompareConfig, EvaluateConfig
from imgclf.evaluation.evaluate import evaluate_run
from imgclf.runs import RunDir

# (key, label, higher is better)
METRICS = [("accuracy", "accuracy", True), ("balanced_accuracy", "balanced accuracy", True),
           ("macro_f1", "macro F1", True), ("weighted_f1", "weighted F1", True), ("top5_accuracy", "top-5 accuracy", True),
           ("ece", "ECE", False), ("log_loss", "log loss", False)]
INFO = [("model", "model"), ("strategy", "strategy"), ("split", "split"), ("n", "images"), ("temperature", "temperature"),
        ("tta", "TTA"), ("train_seconds", "train seconds")]


def compare_runs(cfg: CompareConfig) -> list[dict]:
    """One row per run: its metrics on cfg.split (default: each run's held-out
    split) plus model, strategy and training time from summary.json."""
    rows = []
    for r in cfg.runs:
        run = RunDir(r)
        run.require_model()  # a clear error for a folder that is not a run
        name = cfg.split or run.held_out_split()
        if not run.eval_file(name).exists():
            evaluate_run(EvaluateConfig(run=str(run), split=name, device=cfg.device, engine=cfg.engine,
                                        cache_dir=cfg.cache_dir, report=False), quiet=True)
        m, summary = run.metrics(name), run.summary()
        rows.append({"run": str(run), "model": m.get("model"), "strategy": summary.get("strategy"), "split": name,
                     "data": m.get("data"), "n": m.get("n"), "accuracy": m.get("accuracy"),
                     "balanced_accuracy": m.get("balanced_accuracy"), "macro_f1": (m.get("macro") or {}).get("f1"),
                     "weighted_f1": (m.get("weighted") or {}).get("f1"), "top5_accuracy": m.get("top5_accuracy"),
                     "ece": m.get("ece"), "log_loss": m.get("log_loss"), "temperature": m.get("temperature"),
                     "tta": m.get("tta") or "none", "train_seconds": summary.get("train_seconds")})
    return rows


def format_comparison(rows: list[dict]) -> str:
    """Metrics down, runs across; `*` marks the best value of each metric."""
    if not rows:
        return "no runs"
    names = _short_names([r["run"] for r in rows])
    table = [["", *names]]
    for key, label, higher in METRICS:
        vals = [r.get(key) for r in rows]
        if all(v is None for v in vals):
            continue
        known = [v for v in vals if v is not None]
        best = (max if higher else min)(known) if len(rows) > 1 else None
        table.append([label, *("n/a" if v is None else f"{v:.4f}" + ("*" if v == best else " ") for v in vals)])
    for key, label in INFO:
        vals = [r.get(key) for r in rows]
        table.append([label, *("n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals)])
    w = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in table]
    notes = [f"  {n}: {r['run']}" for n, r in zip(names, rows) if n != r["run"]]
    if len({(r["split"], r["n"], str(Path(r["data"] or "").resolve())) for r in rows}) > 1:
        notes.append("warning: the runs were not evaluated on the same images (split, data or count differ); "
                     "the numbers are not directly comparable. Use --split, or evaluate on the same DATA.")
    return "\n".join(lines + ([""] + notes if notes else []))


def _short_names(paths: list[str]) -> list[str]:
    """The runs' folder names, or longer suffixes where those collide."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)
