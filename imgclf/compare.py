"""`imgclf compare RUN1 RUN2 ...`: several runs side by side on the same split.

Reads each run's RUN/eval_<split>.json (written by training and by
`imgclf evaluate`); a run without one is evaluated first (without touching its
temperature or writing a report)."""

from __future__ import annotations

from pathlib import Path

# (key, label, higher is better)
METRICS = [("accuracy", "accuracy", True), ("balanced_accuracy", "balanced accuracy", True),
           ("macro_f1", "macro F1", True), ("weighted_f1", "weighted F1", True), ("top5_accuracy", "top-5 accuracy", True),
           ("ece", "ECE", False), ("log_loss", "log loss", False)]
INFO = [("model", "model"), ("strategy", "strategy"), ("split", "split"), ("n", "images"), ("temperature", "temperature"),
        ("tta", "TTA"), ("train_seconds", "train seconds")]


def _split_of(run: Path, split: str | None) -> str:
    from .runs import read_json

    if split:
        return split
    sp = run / "splits.json"
    if sp.exists():
        d = read_json(sp)
        return "test" if d.get("test") else "val"
    found = sorted(run.glob("eval_*.json"))
    if found:
        return found[0].stem.removeprefix("eval_")
    raise FileNotFoundError(f"{run}: no splits.json and no eval_*.json; is this a run directory (imgclf train ... --out RUN)?")


def compare_runs(runs: list[str | Path], split: str | None = None, device: str = "auto", engine: str = "auto",
                 cache_dir: str | None = None, printer=None) -> list[dict]:
    """One row per run: its metrics on `split` (default: each run's held-out
    split) plus model, strategy and training time from summary.json."""
    from .runs import model_file_path, read_json

    rows = []
    for r in runs:
        run = Path(r)
        model_file_path(run)  # a clear error for a folder that is not a run
        name = _split_of(run, split)
        path = run / f"eval_{name}.json"
        if not path.exists():
            from .evaluate import evaluate_run

            evaluate_run(run, split=name, device=device, engine=engine, cache_dir=cache_dir,
                         printer=printer or (lambda *a, **k: None))
        m = read_json(path)
        summary = read_json(run / "summary.json") if (run / "summary.json").exists() else {}
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
