"""The `imgclf` command. Heavy imports (torch, timm) happen inside each
command, so `imgclf --help` answers at once."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import fields

from .config import TrainConfig


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, help text from the field's comment."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "data":
            p.add_argument("data", nargs="?", default="", help=f.metadata["help"])
            continue
        flag = "--" + f.name.replace("_", "-")
        t, help_ = hints[f.name], f.metadata["help"]
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.name == "head_hidden":
            p.add_argument(flag, default="", help=help_)
        else:
            base = [a for a in typing.get_args(t) if a is not type(None)] or [t]
            default = f.default
            p.add_argument(flag, type=base[0], default=default, help=help_ + (f" (default: {default})" if default not in (None, "") else ""))


def _config_from_args(a: argparse.Namespace) -> TrainConfig:
    from .train import _parse_ints

    kw = {f.name: getattr(a, f.name) for f in fields(TrainConfig)}
    kw["head_hidden"] = _parse_ints(kw["head_hidden"] or "")
    return TrainConfig(**kw)


def cmd_train(a) -> int:
    from .train import train

    train(_config_from_args(a))
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate_run

    evaluate_run(a.run, a.data, a.split, device=a.device, engine=a.engine, cache_dir=a.cache_dir, tta=a.tta == "flip",
                 calibrate=a.calibrate, report=a.report, suspects=a.suspects, gradcam=a.gradcam)
    return 0


def cmd_compare(a) -> int:
    from .compare import compare_runs, format_comparison

    rows = compare_runs(a.runs, split=a.split, device=a.device, engine=a.engine, cache_dir=a.cache_dir)
    print(json.dumps(rows, indent=2) if a.json else format_comparison(rows))
    return 0


def cmd_predict(a) -> int:
    import csv

    from .predict import expand_paths, load

    clf = load(a.run, device=a.device, engine=a.engine)
    paths = expand_paths(a.paths)
    results = clf.predict(paths, top_k=a.top_k, batch_size=a.batch_size)
    bad = sum("error" in r for r in results)
    if a.format == "json":
        print(json.dumps(results, indent=2))
    elif a.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", "score", "top", "error"])
        for r in results:
            top = ";".join(f"{t['label']}:{t['score']:.4f}" for t in r.get("top", []))
            w.writerow([r["path"], r.get("label", ""), f"{r['score']:.4f}" if "score" in r else "", top, r.get("error", "")])
    else:
        wp = max(10, *(len(r["path"]) for r in results)) if results else 10
        for r in results:
            if "error" in r:
                print(f"{r['path']:<{wp}}  ERROR {r['error']}")
            else:
                print(f"{r['path']:<{wp}}  " + "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"]))
    if bad:
        print(f"{bad} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 0 if bad < len(results) or not results else 1


def cmd_check(a) -> int:
    from .check import check_dataset, format_report

    r = check_dataset(a.data, a.val_fraction, a.test_fraction, a.seed)
    print(json.dumps(r, indent=2) if a.json else format_report(r))
    return 0


def cmd_models(a) -> int:
    from .models import MODELS

    rows = [("name", "input", "pretrained weights", "available here")]
    for name, info in MODELS.items():
        avail = "n/a (from scratch)" if not info.pretrained else ("yes" if info.weights_available() else "no (see source)")
        rows.append((name + (" (default)" if name == "efficientnet_lite0" else ""), f"{info.preprocess.size}px",
                     info.weights_source, avail))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    return 0


def cmd_cache(a) -> int:
    from pathlib import Path

    from .features import cache_clear, cache_info, default_cache_dir

    root = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    if a.action == "clear":
        n = cache_clear(root)
        print(f"cleared {root} ({n / 1e6:.1f} MB)")
        return 0
    rows = cache_info(root)
    print(f"cache: {root}")
    if not rows:
        print("  empty")
    for r in rows:
        print(f"  {r['key']}  {r.get('model', '?'):<20} {str(r.get('size', '?')) + 'px':>6} {r.get('variant', '?'):<6}"
              f" {r['entries']:>7} images {r['bytes'] / 1e6:>8.1f} MB")
    print(f"  total {sum(r['bytes'] for r in rows) / 1e6:.1f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="imgclf", description="Train, evaluate, export and serve CNN image classifiers.")
    p.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a classifier on a folder of labelled images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter if False else argparse.HelpFormatter)
    _add_config_flags(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="metrics, calibration and an HTML report of a run on its held-out split")
    e.add_argument("run", help="run directory")
    e.add_argument("data", nargs="?", default=None, help="data root (default: the one recorded in the run)")
    e.add_argument("--split", choices=["test", "val", "train"], default=None, help="default: test, else val")
    e.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="test-time augmentation: flip averages with the mirrored image (the report shows both)")
    e.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit temperature scaling on the val split and store it in model.pt (default: on)")
    e.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write RUN/report/index.html and RUN/report/eval.json (default: on)")
    e.add_argument("--suspects", action=argparse.BooleanOptionalAction, default=True,
                   help="report training images whose label looks wrong (out-of-fold; default: on)")
    e.add_argument("--gradcam", action=argparse.BooleanOptionalAction, default=True,
                   help="Grad-CAM heatmaps for a few predictions in the report (default: on)")
    _runtime_flags(e)
    e.set_defaults(fn=cmd_evaluate)

    co = sub.add_parser("compare", help="side-by-side metrics of several runs on the same split")
    co.add_argument("runs", nargs="+", help="run directories")
    co.add_argument("--split", choices=["test", "val"], default=None, help="default: each run's held-out split")
    co.add_argument("--json", action="store_true", help="machine-readable output")
    _runtime_flags(co)
    co.set_defaults(fn=cmd_compare)

    pr = sub.add_parser("predict", help="top-k labels for image files or folders")
    pr.add_argument("run", help="run directory or model.pt")
    pr.add_argument("paths", nargs="+", help="image files or folders")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--format", choices=["table", "json", "csv"], default="table")
    pr.add_argument("--batch-size", type=int, default=32)
    _runtime_flags(pr)
    pr.set_defaults(fn=cmd_predict)

    c = sub.add_parser("check", help="report counts, formats, unreadable files, duplicates, leakage, imbalance, outliers")
    c.add_argument("data")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--test-fraction", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=cmd_check)

    m = sub.add_parser("models", help="list the available models")
    m.set_defaults(fn=cmd_models)

    ca = sub.add_parser("cache", help="show or empty the feature cache")
    ca.add_argument("action", choices=["info", "clear"])
    ca.add_argument("--cache-dir", default=None)
    ca.set_defaults(fn=cmd_cache)
    _add_deploy_commands(sub)
    return p


def _runtime_flags(p) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--engine", default="auto", help="feature extraction: auto | torch | onnxruntime")
    if not any(a.dest == "cache_dir" for a in p._actions):
        p.add_argument("--cache-dir", default=None, help="feature cache folder")


def cmd_export(a) -> int:
    from .export import export

    r = export(a.run, fmt=a.format, out=a.out, int8=a.int8, max_drop=a.max_drop, force=a.force,
               calib_images=a.calib_images, check_images=a.check_images)
    if a.json:
        print(json.dumps(r, indent=2))
    return 0


def cmd_serve(a) -> int:
    # Only imgclf.serve (and, for a run directory, torch): an .onnx needs neither torch nor onnx.
    from .serve import ServeConfig, serve

    cfg = ServeConfig(model=str(a.model), max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms,
                      api_key=a.api_key or os.environ.get("IMGCLF_API_KEY") or None,
                      max_body_bytes=int(a.max_body_mb * 2**20), max_files=a.max_files, max_pixels=a.max_pixels,
                      default_top_k=a.top_k)
    serve(cfg, host=a.host, port=a.port, workers=a.workers)
    return 0


def _add_deploy_commands(sub) -> None:
    """`imgclf export` and `imgclf serve` (issue 5: deploy)."""
    ex = sub.add_parser("export", help="write a self-contained ONNX (optionally INT8) or TorchScript model file")
    ex.add_argument("run", help="run directory or model.pt")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", default=None, help="output file (default: RUN/model.onnx, model.int8.onnx, "
                                                 "model.torchscript.pt)")
    ex.add_argument("--int8", action="store_true", help="static INT8 quantization (onnxruntime), calibrated on "
                                                        "training images; reports accuracy change and speed-up")
    ex.add_argument("--max-drop", type=float, default=1.0,
                    help="refuse an INT8 model whose validation accuracy drops by more points than this (default: 1)")
    ex.add_argument("--force", action="store_true", help="write the INT8 model even over --max-drop")
    ex.add_argument("--calib-images", type=int, default=100, help="training images for INT8 calibration")
    ex.add_argument("--check-images", type=int, default=32, help="validation images for the PyTorch parity check")
    ex.add_argument("--json", action="store_true", help="print the export report as JSON")
    ex.set_defaults(fn=cmd_export)

    sv = sub.add_parser("serve", help="REST API (/v1/predict) and a web page for a run or an exported .onnx")
    sv.add_argument("model", help="an .onnx from `imgclf export` (no torch needed) or a run directory")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (default: loopback)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="server processes (each loads the model)")
    sv.add_argument("--max-batch", type=int, default=32, help="most images per model call (micro-batching)")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more images")
    sv.add_argument("--api-key", default=None, help="require this key on /v1/* (X-API-Key or Authorization: "
                                                    "Bearer); or set IMGCLF_API_KEY")
    sv.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body, MiB")
    sv.add_argument("--max-files", type=int, default=16, help="most images per request")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, help="largest decoded image, pixels")
    sv.add_argument("--top-k", type=int, default=5, help="labels per image unless the request says otherwise")
    sv.set_defaults(fn=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError

    known = (DataError, ValueError, FileNotFoundError, KeyError, ImportError)
    try:
        from .models import WeightsUnavailable
        from .train import RunExists

        known = known + (WeightsUnavailable, RunExists)
    except ImportError:
        pass
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        return 130
    except known as e:
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, ImportError) and getattr(e, "name", None) in ("torch", "torchvision", "timm", "sklearn", "onnx"):
            msg += (f"\n  `imgclf {args.cmd}` needs the training extras: pip install 'imgclf[train]'"
                    " (exported .onnx models run without them)")
        print(f"imgclf {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
