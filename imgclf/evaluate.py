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
                 workers: int | None = None, tta: bool = False, printer=print, calibrate: bool = False,
                 report: bool = False, suspects: bool = True, gradcam: bool = True) -> dict:
    """Evaluate RUN on its held-out split (test, else val) as recorded in
    RUN/splits.json; with DATA, the same relative files under another root.
    Writes RUN/eval_<split>.json and returns the metrics.

    calibrate: fit temperature scaling on the validation split and store T in
    RUN/model.pt (so `predict` returns calibrated probabilities).
    report: also write RUN/report/index.html and RUN/report/eval.json (with
    Grad-CAM and label-noise suspects unless switched off).
    The CLI turns both on; training's own final evaluation leaves them off."""
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
    w = default_workers() if workers is None else workers
    logits, labels, kept = clf.logits_items(splits.root, items, workers=w, bad=bad,
                                            variants=("plain", "flip") if tta else ("plain",))
    cal = _calibrate(run, clf, splits, name, logits, labels, w, bad, printer) if calibrate else None
    # The temperature(s) the probabilities are scored with: the stored T, or per
    # image a T fit on the other folds when T was fit on this very split.
    t_eval = cal.pop("t_eval") if cal else clf.temperature
    probs = _probs(logits, t_eval)
    m = classification_metrics(labels, probs, clf.classes)
    m.update({"split": name, "run": str(run), "data": splits.root, "model": clf.arch, "tta": "flip" if tta else None,
              "skipped": len(bad.seen), "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()],
              "seconds": round(time.time() - t0, 2),
              "temperature": clf.temperature})
    from .calibration import reliability

    rel = reliability(probs, labels)
    m["ece"] = rel["ece"]
    if cal:
        m["calibration"] = {k: v for k, v in cal.items() if not k.startswith("reliability")}
    elif calibrate:
        m["calibration_note"] = "no validation split to fit a temperature on; the run's stored T was kept"
    tta_cmp = _tta_comparison(logits, labels, clf.classes, t_eval) if tta else None
    if tta_cmp:
        m["tta_comparison"] = tta_cmp
    write_json(run / f"eval_{name}.json", m)
    printer(f"\n{name} split ({len(labels)} images, {splits.root}):")
    printer(format_metrics(m))
    if cal:
        printer(f"\ncalibration: T = {cal['temperature']:.3f} fitted on val ({cal['fitted_on_n']} images), stored in "
                f"{run / 'model.pt'}; ECE {100 * cal['ece_before']:.2f}% -> {100 * cal['ece_after']:.2f}%, "
                f"log loss {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}")
    if tta_cmp:
        a, b = tta_cmp["plain"], tta_cmp["flip"]
        printer(f"flip TTA: accuracy {a['accuracy']:.4f} -> {b['accuracy']:.4f} "
                f"({tta_cmp['fixed']} fixed, {tta_cmp['broken']} broken)")
    printer(f"\nwritten {run / f'eval_{name}.json'}")
    if report:
        from .report import build_report

        m_rep = {**m, "reliability": rel}
        page = build_report(run, clf, splits, name, [items[i][0] for i in kept], labels, probs, m_rep, cal, tta_cmp,
                            workers=w, bad=bad, suspects=suspects, gradcam=gradcam, printer=printer)
        printer(f"report: {page} (open it in a browser)")
    return m


def _probs(logits: dict, temperature) -> np.ndarray:
    """softmax(logits / T), averaged with the mirrored image's under flip TTA
    (the same as Classifier.predict_proba_items)."""
    from .calibration import softmax

    p = softmax(logits["plain"], temperature)
    if "flip" in logits:
        p = (p + softmax(logits["flip"], temperature)) / 2
    return p


def _calibrate(run: Path, clf, splits: Splits, name: str, logits: dict, labels: np.ndarray, workers: int, bad,
               printer) -> dict | None:
    """Fit T on the validation split's logits (from the feature cache), store
    it in RUN/model.pt, and measure ECE and log loss before and after on the
    evaluated split."""
    from .calibration import cross_fit_temperatures, fit_temperature, nll, reliability, store_temperature

    if name == "val":
        vl, vy = logits["plain"], labels
    elif splits.val:
        vlog, vy, _ = clf.logits_items(splits.root, splits.val, workers=workers, bad=bad, progress=False)
        vl = vlog["plain"]
    else:
        printer("note: no validation split to fit a temperature on; keeping the run's stored temperature")
        return None
    if len(vy) < 10 or len(np.unique(vy)) < 2:
        printer(f"note: {len(vy)} validation image(s) are too few to fit a temperature; keeping the stored one")
        return None
    t = fit_temperature(vl, vy)
    store_temperature(run, t)
    clf.temperature = t
    before = _probs(logits, 1.0)
    # When T was fit on the split being evaluated, score each image with a T
    # fit on the other folds, or "after" would flatter itself.
    cross = name == "val"
    t_eval = cross_fit_temperatures(logits["plain"], labels)[:, None] if cross else t
    after = _probs(logits, t_eval)
    rb, ra = reliability(before, labels), reliability(after, labels)
    idx = np.arange(len(labels))
    return {"temperature": t, "fitted_on": "val", "fitted_on_n": int(len(vy)), "cross_fitted": cross, "t_eval": t_eval,
            "ece_before": rb["ece"], "ece_after": ra["ece"],
            "nll_before": float(-np.log(np.clip(before[idx, labels], 1e-12, 1)).mean()) if len(labels) else 0.0,
            "nll_after": float(-np.log(np.clip(after[idx, labels], 1e-12, 1)).mean()) if len(labels) else 0.0,
            "val_nll_before": nll(vl, vy, 1.0), "val_nll_after": nll(vl, vy, t),
            "reliability_before": rb, "reliability_after": ra}


def _tta_comparison(logits: dict, labels: np.ndarray, classes: list[str], temperature) -> dict:
    """Metrics without and with flip TTA, and how many predictions it changed."""
    from .calibration import ece

    out = {}
    preds = {}
    for k, lg in (("plain", {"plain": logits["plain"]}), ("flip", logits)):
        p = _probs(lg, temperature)
        mm = classification_metrics(labels, p, classes)
        preds[k] = p.argmax(1)
        out[k] = {"accuracy": mm["accuracy"], "balanced_accuracy": mm["balanced_accuracy"], "macro_f1": mm["macro"]["f1"],
                  "log_loss": mm["log_loss"], "ece": ece(p, labels)}
    a, b = preds["plain"] == labels, preds["flip"] == labels
    out.update({"changed": int((preds["plain"] != preds["flip"]).sum()), "fixed": int((~a & b).sum()),
                "broken": int((a & ~b).sum())})
    return out


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
