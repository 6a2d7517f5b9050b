"""`imgclf evaluate RUN [DATA]`: metrics on the split the model never saw."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .data import BadFileLog, Splits, discover, scan
from .metrics import classification_metrics, format_metrics
from .runs import read_json, write_json


def evaluate_run(run: str | Path, data: str | Path | None = None, split: str | None = None,
                 device: str = "auto", engine: str = "auto", cache_dir: str | None = None,
                 workers: int | None = None, tta: bool = False, printer=print) -> dict:
    """Evaluate RUN on its held-out split (test, else val) as recorded in
    RUN/splits.json; with DATA, the same relative files under another root.
    Writes RUN/eval_<split>.json and returns the metrics."""
    from .data import default_workers
    from .predict import load

    run = Path(run)
    clf = load(run, device=device, engine=engine, cache_dir=cache_dir)
    splits = _run_splits(run, data, clf.classes)
    name, items = splits.eval_split(split)
    if split is None and name == "val":
        printer("note: this data has no test split; evaluating on val (which also chose the best epoch, "
                "so this figure is slightly optimistic)")
    bad = BadFileLog(printer)
    holder = Splits(splits.root, splits.classes, [], [], [], splits.layout)
    setattr(holder, name, list(items))
    for rel, reason in scan(holder, (name,)):
        bad.add(rel, reason)
    items = getattr(holder, name)
    t0 = time.time()
    probs, labels, kept = clf.predict_proba_items(splits.root, items, workers=default_workers() if workers is None else workers,
                                                  bad=bad, flip=tta)
    m = classification_metrics(labels, probs, clf.classes)
    m.update({"split": name, "run": str(run), "data": splits.root, "model": clf.arch, "tta": "flip" if tta else None,
              "skipped": len(bad.seen), "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()],
              "seconds": round(time.time() - t0, 2),
              "temperature": clf.temperature})
    write_json(run / f"eval_{name}.json", m)
    printer(f"\n{name} split ({len(labels)} images, {splits.root}):")
    printer(format_metrics(m))
    printer(f"\nwritten {run / f'eval_{name}.json'}")
    return m


def _run_splits(run: Path, data, classes: list[str]) -> Splits:
    sp = run / "splits.json"
    if sp.exists():
        d = read_json(sp)
        if data is not None and Path(data).resolve() != Path(d["root"]).resolve():
            # Another copy of the same data, or a new labelled folder: use its own layout if it differs.
            if Path(data).is_dir() and not all((Path(data) / p).exists() for p, _ in (d["test"] or d["val"])[:20]):
                return _new_data(data, classes)
            return Splits.from_dict(d, root=str(Path(data).resolve()))
        return Splits.from_dict(d)
    if data is None:
        raise FileNotFoundError(f"{sp} is missing; pass the data folder: imgclf evaluate {run} DATA")
    return _new_data(data, classes)


def _new_data(data, classes: list[str]) -> Splits:
    """Labelled data the run has never seen: all of it is evaluated."""
    s = discover(data, val_fraction=0.0, test_fraction=0.0)
    unknown = set(s.classes) - set(classes)
    if unknown:
        raise ValueError(f"{data}: classes {sorted(unknown)} are not among the model's classes {classes}")
    remap = {i: classes.index(c) for i, c in enumerate(s.classes)}
    items = [(p, remap[y]) for p, y in (s.train + s.val + s.test)]
    if s.layout == "split-folders" and (s.test or s.val):
        items = [(p, remap[y]) for p, y in (s.test or s.val)]
    return Splits(s.root, classes, [], [], items, s.layout)
