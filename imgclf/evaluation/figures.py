"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes.

Every figure scales with the number of classes: cell annotations only while
they fit, tick labels that shrink and then thin out, legends only while they
can be read. Matplotlib is imported inside each function so that importing
imgclf stays fast.
"""

from __future__ import annotations

import io

import numpy as np

BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # text.parse_math off: class names are text, never TeX ("$\\notacmd{$" crashed the report, "price_$5_$" became math).
    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": False, "savefig.facecolor": "white", "text.parse_math": False})
    return plt


def _png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def confusion_png(cm, classes: list[str], normalize: bool, unit: str = "images") -> bytes:
    """Confusion matrix (rows: true, columns: predicted), counts or
    row-normalised (each row sums to 1: the recall on the diagonal); `unit`
    names what is counted."""
    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    n = len(classes)
    if normalize:
        rows = cm.sum(1, keepdims=True)
        data = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    else:
        data = cm
    # About 0.55 in per cell for a few classes, down to 0.12 in for 100; the
    # figure stays between 4 and 14 inches so it fits a page.
    side = float(np.clip(1.6 + 0.55 * n if n <= 12 else 2.0 + 0.12 * n, 4.0, 14.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, data.max()), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else unit)
    tick_fs = float(np.clip(220 / max(n, 1), 4, 10))
    step = max(1, int(np.ceil(n / 100)))  # beyond 100 classes, label every k-th
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks, [_short(classes[i]) for i in ticks], rotation=90 if n > 6 else 0, fontsize=tick_fs)
    ax.set_yticks(ticks, [_short(classes[i]) for i in ticks], fontsize=tick_fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("row-normalised (recall on the diagonal)" if normalize else "counts")
    if n <= 15:
        fs = 12 if n <= 4 else 9 if n <= 8 else 7
        hi = (1 if normalize else data.max()) / 2
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                txt = (f"{v:.2f}" if v else "0") if normalize else f"{int(v)}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs, color="white" if v > hi else "black")
    else:
        ax.tick_params(length=2)
    for s in ax.spines.values():
        s.set_visible(True)
    return _png(fig)


def curves_png(history: list[dict], best_epoch: int | None = None) -> bytes:
    """Loss and validation metrics per epoch from history.csv, stages marked."""
    plt = _plt()
    ep = np.array([int(r["epoch"]) for r in history])

    def col(k):
        return np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in history])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    a1.plot(ep, col("train_loss"), color=BLUE, label="train loss")
    a1.plot(ep, col("val_loss"), color=ORANGE, label="validation loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy")
    a1.set_title("loss")
    for k, c, lab in (("val_acc", ORANGE, "validation accuracy"), ("val_balanced_acc", GREEN, "validation balanced acc."),
                      ("train_acc", BLUE, "train accuracy")):
        if history and k in history[0]:
            a2.plot(ep, col(k), color=c, label=lab, alpha=0.6 if k == "train_acc" else 1,
                    ls="--" if k == "train_acc" else "-")
    a2.set_xlabel("epoch")
    a2.set_title("accuracy")
    stages = [r.get("stage") for r in history]
    for ax in (a1, a2):
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(ep[i] - 0.5, color=GREY, ls=":", lw=1)
                ax.text(ep[i] - 0.5, 1.0, f" {stages[i]}", transform=ax.get_xaxis_transform(), fontsize=8,
                        color=GREY, va="top")
        if best_epoch:
            ax.axvline(best_epoch, color=RED, lw=1, alpha=0.5)
            ax.text(best_epoch, 0.02, " best", transform=ax.get_xaxis_transform(), fontsize=8, color=RED)
        ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def roc_pr_png(curves: dict, classes: list[str]) -> bytes:
    """ROC and precision-recall curves; AUCs in the legend while there are
    few curves, in the titles (macro) when there are many."""
    plt = _plt()
    per = curves["per_class"]
    many = len(per) > 10
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    cmap = plt.get_cmap("tab10")
    for k, (name, c) in enumerate(per.items()):
        kw = {"lw": 0.8, "alpha": 0.35, "color": BLUE} if many else {"lw": 1.8, "color": cmap(k % 10)}
        lab = None if many else (f"AUC {c['roc_auc']:.3f}" if curves.get("positive") else f"{_short(name)}  {c['roc_auc']:.3f}")
        a1.plot(c["fpr"], c["tpr"], label=lab, **kw)
        lab = None if many else (f"AP {c['average_precision']:.3f}" if curves.get("positive")
                                 else f"{_short(name)}  {c['average_precision']:.3f}")
        a2.step(c["recall"], c["precision"], where="post", label=lab, **kw)
    a1.plot([0, 1], [0, 1], color=GREY, ls=":", lw=1)
    a1.set_xlabel("false positive rate")
    a1.set_ylabel("true positive rate")
    a2.set_xlabel("recall")
    a2.set_ylabel("precision")
    if curves.get("positive"):
        pos = curves["positive"]
        a1.set_title(f"ROC, positive class '{_short(pos, 30)}'")
        a2.set_title(f"precision-recall, positive class '{_short(pos, 30)}'")
        prev = per[pos]["prevalence"] if pos in per else None
        if prev is not None:
            a2.axhline(prev, color=GREY, ls=":", lw=1)
    else:
        a1.set_title(f"ROC, one-vs-rest ({len(per)} classes; macro AUC {curves.get('macro_roc_auc', float('nan')):.3f})")
        a2.set_title(f"precision-recall, one-vs-rest (macro AP {curves.get('macro_average_precision', float('nan')):.3f})")
    for ax in (a1, a2):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        if not many and per:
            ax.legend(fontsize=8, frameon=False, loc="lower right" if ax is a1 else "lower left",
                      title=None if curves.get("positive") else "class  area")
    return _png(fig)


def reliability_png(before: dict, after: dict | None, t: float | None) -> bytes:
    """Reliability diagrams (accuracy vs confidence per bin; the diagonal is
    perfect calibration) with the confidence histogram beneath, before and
    after temperature scaling."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    panels = [("before (T = 1)", before)] + ([(f"after temperature scaling (T = {t:.2f})", after)] if after else [])
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 5.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for k, (title, r) in enumerate(panels):
        ax, hx = axes[0, k], axes[1, k]
        edges = np.array(r["edges"])
        width = np.diff(edges)
        acc = np.array([np.nan if v is None else v for v in r["accuracy"]])
        conf = np.array([np.nan if v is None else v for v in r["confidence"]])
        has = np.isfinite(acc)
        ax.bar(edges[:-1][has], acc[has], width=width[has], align="edge", color="#9ecae1", edgecolor="white",
               label="accuracy in bin")
        # Mean confidence per bin as a tick, joined to the bar top: the gap is what ECE averages.
        mid = (edges[:-1] + width / 2)[has]
        ax.vlines(mid, acc[has], conf[has], color=RED, lw=1.5)
        ax.hlines(conf[has], edges[:-1][has] + 0.15 * width[has], edges[1:][has] - 0.15 * width[has], color=RED, lw=2,
                  label="mean confidence in bin")
        ax.plot([0, 1], [0, 1], color=GREY, ls=":", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE {100 * r['ece']:.2f}%", fontsize=10)
        ax.legend(fontsize=8, frameon=False, loc="upper left")
        hx.bar(edges[:-1], r["count"], width=width, align="edge", color=GREY, edgecolor="white")
        hx.set_xlim(0, 1)
        hx.set_yscale("symlog", linthresh=1)
        hx.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        hx.set_xlabel("confidence (top-1 probability)")
        hx.set_ylabel("images")
    fig.tight_layout()
    return _png(fig)


def pr_curves_png(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> bytes | None:
    """Multi-label: per-label precision-recall curves, each with its operating
    point (the stored threshold); None when no label is both present and absent."""
    from sklearn.metrics import precision_recall_curve

    present = [j for j in range(len(classes)) if 0 < y[:, j].sum() < len(y)]
    if not present:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for j in present[:20]:
        prec, rec, _ = precision_recall_curve(y[:, j], p[:, j])
        line, = ax.plot(rec, prec, lw=1.5, label=_short(classes[j]))
        on = p[:, j] >= thresholds[j]
        tp = (on & (y[:, j] > 0.5)).sum()
        ax.plot(tp / max(1, (y[:, j] > 0.5).sum()), tp / max(1, on.sum()), "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="Precision-recall per label (dot: stored threshold)")
    if len(present) <= 12:
        ax.legend(fontsize=8, loc="lower left")
    return _png(fig)
