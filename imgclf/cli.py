"""The `imgclf` command, generated from the config dataclasses in config.py:
one sub-command per dataclass, one flag per field. Heavy imports (torch, timm)
happen inside each command, so `imgclf --help` answers at once and serving an
.onnx never imports torch.

Only `ImgclfError` (bad input, missing files, a setting out of range) becomes a
one-line message; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
import typing

from imgclf import config as C
from imgclf._version import __version__
from imgclf.errors import ConfigError, ImgclfError
from imgclf.inference import expand_paths, reject_threshold
from imgclf.io import write_error
from imgclf.log import setup_cli
from imgclf.runs import RunDir
from imgclf.tasks import load, task_for_data, task_of, train, verbs


def add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    """One argument per field of `cls`: positional where the field says so,
    bools as --x/--no-x, help and choices from the field's metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, t = f.metadata, hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw = {"help": meta["help"], "choices": meta.get("choices")}
        if "positional" in meta:
            nargs = meta["positional"]
            p.add_argument(f.name, **({} if nargs == 1 else {"nargs": nargs, "default": default}), **kw)
            continue
        flags = ([meta["short"]] if "short" in meta else []) + [meta.get("flag") or "--" + f.name.replace("_", "-")]
        kw["dest"] = f.name
        if t is bool or set(typing.get_args(t)) == {bool, type(None)}:  # None: "auto", decided later
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        base = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        typ = str if f.name == "head_hidden" or typing.get_origin(base[0]) is tuple else base[0]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kw["help"] += f" (default: {shown})" if shown not in (None, "") else ""
        p.add_argument(*flags, type=typ, default=default, **kw)


def config_from_args(cls, a: argparse.Namespace):
    return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------- commands

def cmd_train(cfg: C.TrainConfig) -> int:
    train(cfg)
    return 0


def cmd_evaluate(cfg: C.EvaluateConfig) -> int:
    verbs(task_of(cfg.run)).evaluate(cfg)
    return 0


def cmd_compare(cfg: C.CompareConfig) -> int:
    from imgclf.evaluation.compare import compare_runs, format_comparison  # deferred: verbs load only what they need

    rows = compare_runs(cfg)
    print(json.dumps(rows, indent=2) if cfg.json else format_comparison(rows))
    return 0


def cmd_predict(cfg: C.PredictConfig) -> int:
    reject_threshold(cfg.reject, None)  # a bad --reject fails before the model loads
    model = load(cfg.run, device=cfg.device, engine=cfg.engine, cache_dir=cfg.cache_dir)
    task = verbs(getattr(model, "task", "classify"))
    if getattr(task, "save_images", None) is None and (cfg.conf is not None or cfg.save_images):
        raise ConfigError("--conf and --save-images are for detection models", "leave them out for this model")
    if cfg.reject is not None:
        if not hasattr(model, "set_reject"):
            raise ConfigError(f"--reject is for classifiers; {cfg.run} is a {task_of(cfg.run)} model", "leave it out")
        model.set_reject(cfg.reject)
    opts = {"conf": cfg.conf} if cfg.conf is not None else {}
    results = model.predict(expand_paths(cfg.paths), top_k=cfg.top_k, batch_size=cfg.batch_size, **opts)
    print(task.format_answers(results, cfg.format))
    if cfg.save_images:
        n = task.save_images(results, model.classes, cfg.save_images)
        print(f"{n} image(s) with their boxes -> {cfg.save_images}", file=sys.stderr)
    if cfg.save_masks:
        if getattr(task, "save_masks", None) is None:
            raise ConfigError("--save-masks is for segmentation runs", "leave it out for this run")
        n = task.save_masks(results, model.classes, cfg.save_masks)
        print(f"{n} label map(s) and overlay(s) -> {cfg.save_masks}", file=sys.stderr)
    bad = sum("error" in r for r in results)
    if bad:
        print(f"{bad} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 0 if bad < len(results) or not results else 1


def cmd_embed(cfg: C.EmbedConfig) -> int:
    from imgclf.data_engine.embed import embed_command, write_embeddings  # deferred: verbs load only what they need

    emb = embed_command(cfg)
    files = write_embeddings(emb, cfg.out)
    dim = emb.vectors.shape[1] if len(emb.vectors) else 0
    print(f"{len(emb.paths)} embeddings of {dim} dimensions ({emb.model}, {emb.source}) -> "
          f"{', '.join(map(str, files))}" + (f"; {len(emb.skipped)} unreadable file(s) skipped" if emb.skipped else ""))
    return 0


def cmd_similar(cfg: C.SimilarConfig) -> int:
    from imgclf.data_engine.similar import format_similar, similar_images  # deferred: verbs load only what they need

    results = similar_images(cfg)
    print(json.dumps(results, indent=2) if cfg.format == "json" else format_similar(results, RunDir(cfg.run).splits().root))
    return 0 if any("neighbours" in r for r in results) else 1


def cmd_suggest(cfg: C.SuggestConfig) -> int:
    from imgclf.data_engine.suggest import suggest  # deferred: verbs load only what they need

    rows, out = suggest(cfg)
    for r in rows[:10]:
        print(f"{r['rank']:>4}  {r['path']}  ({r['why']})")
    more = f" ({len(rows) - 10} more in the file)" if len(rows) > 10 else ""
    print(f"{len(rows)} images to label next{more} -> {out}: fill in the label column, then train on it")
    return 0


def cmd_check(cfg: C.CheckConfig) -> int:
    report, text = verbs(task_for_data(cfg.data, cfg.task)).check(cfg)
    print(json.dumps(report, indent=2, default=str) if cfg.json else text)
    return 1 if (report.get("fix") or {}).get("refused") else 0  # --fix would drop too much: nothing written


def cmd_models(cfg: C.ModelsConfig) -> int:
    from imgclf.models.registry import MODELS  # deferred: verbs load only what they need

    rows = [("name", "input", "pretrained weights", "available here")]
    for name, info in MODELS.items():
        avail = "n/a (from scratch)" if not info.pretrained else ("yes" if info.weights_available() else "no (see source)")
        rows.append((name + (" (default)" if name == C.TrainConfig().model else ""), f"{info.preprocess.size}px",
                     info.weights_source, avail))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    return 0


def cmd_cache(cfg: C.CacheConfig) -> int:
    from pathlib import Path

    from imgclf.models.features import (  # deferred: verbs load only what they need
        cache_clear,
        cache_info,
        default_cache_dir,
    )

    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.action == "clear":
        print(f"cleared {root} ({cache_clear(root) / 1e6:.1f} MB)")
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


def cmd_export(cfg: C.ExportConfig) -> int:
    from imgclf.deploy.export import export  # deferred: verbs load only what they need

    r = export(cfg)
    if cfg.json:
        print(json.dumps(r, indent=2))
    return 0


def cmd_serve(cfg: C.ServeConfig) -> int:
    # Only imgclf.deploy.serve (and, for a run directory, torch): an .onnx needs neither torch nor onnx.
    from imgclf.deploy.serve import checked_api_key, serve  # deferred: verbs load only what they need

    cfg.api_key = checked_api_key(cfg.api_key, os.environ)
    serve(cfg)
    return 0


COMMANDS = {  # name: (config class, function, one-line help)
    "train": (C.TrainConfig, cmd_train, "train a classifier (class folders, CSV), a detector (VOC, COCO, YOLO labels, instance masks) or a segmenter (mask PNGs)"),
    "evaluate": (C.EvaluateConfig, cmd_evaluate, "metrics, calibration and an HTML report of a run on its held-out split"),
    "compare": (C.CompareConfig, cmd_compare, "side-by-side metrics of several runs on the same split"),
    "predict": (C.PredictConfig, cmd_predict, "top-k labels for image files or folders"),
    "check": (C.CheckConfig, cmd_check, "report counts, formats, unreadable files, exact and near duplicates, leakage, imbalance, outliers; --fix writes a cleaned split"),
    "embed": (C.EmbedConfig, cmd_embed, "one embedding per image (path, label, split) to Parquet or .npy"),
    "similar": (C.SimilarConfig, cmd_similar, "the training images most similar to each given image"),
    "suggest": (C.SuggestConfig, cmd_suggest, "rank unlabeled images by how much labelling them should help"),
    "models": (C.ModelsConfig, cmd_models, "list the available models"),
    "cache": (C.CacheConfig, cmd_cache, "show or empty the feature cache"),
    "export": (C.ExportConfig, cmd_export, "a self-contained model: ONNX, .ort, TorchScript, TFLite (INT8 optional) or a web app"),
    "serve": (C.ServeConfig, cmd_serve, "REST API (/v1/predict) and a web page for a run or an exported .onnx"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgclf", description="Train, evaluate, export and serve CNN image classifiers.")
    p.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (cls, fn, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_config_flags(sp, cls)
        sp.set_defaults(cls=cls, fn=fn)
    return p


def run() -> None:
    """The `imgclf` command (and `python -m imgclf`): main, then a fast exit.
    With torch loaded, the interpreter's teardown takes about 1.1 s (measured:
    5.3 s wall for 4.0 s of imports); every file imgclf writes is closed (and
    renamed into place) before main returns, so there is nothing left to do."""
    code = main()
    if "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 tells the story; the other ranks speak only of errors.
    setup_cli(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR)
    try:
        cfg = config_from_args(args.cls, args)
        if args.cls is C.TrainConfig and cfg.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
            from imgclf.training.distributed import launch  # deferred: verbs load only what they need

            return launch(argv[argv.index("train") + 1:], cfg.nproc_per_node)
        if args.cls is C.TrainConfig:
            from imgclf.training.train import parse_ints  # deferred: verbs load only what they need

            cfg.head_hidden = parse_ints(cfg.head_hidden or "")
        return args.fn(cfg) or 0
    except KeyboardInterrupt:
        return 130
    except ImgclfError as e:
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write no atomic writer saw (a library's own file): still one line, not a traceback
        if e.errno not in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT) or os.environ.get("IMGCLF_DEBUG"):
            raise

        print(f"imgclf {args.cmd}: error: {write_error(e.filename or 'an output file', e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional extra is not installed: the user's fix, not a bug
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if not extra or os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf {args.cmd}: error: needs {e.name}, which is not installed; pip install 'imgclf[{extra}]'"
              + (" (exported .onnx models run without it)" if extra == "train" else ""), file=sys.stderr)
        return 2


EXTRAS = {"imagehash": "train", "torch": "train", "torchvision": "train", "timm": "train", "sklearn": "train",
          "onnx": "train", "usearch": "train", "scipy": "train", "matplotlib": "report", "fastapi": "serve",
          "uvicorn": "serve", "python_multipart": "serve", "prometheus_client": "serve", "ai_edge_litert": "litert",
          "litert_torch": "mobile", "ai_edge_quantizer": "mobile",
          "tensorboard": "tensorboard", "mlflow": "mlflow"}


if __name__ == "__main__":
    sys.exit(main())
