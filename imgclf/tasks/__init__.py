"""The task registry: what a model is asked about an image.

    classify  one label (or several) per image      imgclf.tasks.classify
    detect    boxes (and masks) of objects          imgclf.tasks.detect.task
    segment   a class per pixel                     imgclf.tasks.segment.task

A task is chosen from the data (`task_for_data`: VOC XML, COCO instances JSON,
a YOLO data.yaml or instance-mask PNGs mean detect; class folders and CSVs
classify), `--task` overrides it, and the run records it (config.json "task",
and the model file). Every later command reads it back (`task_of`).

Each task is one module with the same verbs, called by the CLI, the exporter
and the server, which know nothing else about the task:

    train(cfg: TrainConfig) -> dict               the run's summary
    evaluate(cfg: EvaluateConfig) -> dict         metrics of a run on held-out data (or another dataset)
    check(cfg: CheckConfig) -> tuple[dict, str]   the data report and its text
    load(path, device, engine, cache_dir, threads) -> a predictor: .predict(inputs, batch_size, **opts) -> answers
    format_answers(answers, fmt) -> str           what `imgclf predict` prints

The verb modules import torch; this module does not, so sniffing the data and
serving an exported file stay light. Adding a task: a package under
imgclf/tasks/<name>/ with those verbs, a sniffer in its data module, and one
entry below (docs/architecture.md, "Adding a task").
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.inference.litert_predictor import LiteRTPredictor
from imgclf.inference.load import model_format
from imgclf.inference.onnx_predictor import OnnxPredictor, open_session
from imgclf.io import torch_load
from imgclf.runs import RunDir
from imgclf.tasks.detect.formats import detect_format
from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
from imgclf.tasks.segment.data import segment_format
from imgclf.tasks.segment.onnx_predictor import OnnxSegPredictor


@dataclass(frozen=True)
class TaskInfo:
    name: str
    help: str
    verbs: str  # the module holding the task's verbs, imported on first use (it imports torch)
    sniff: Callable[[Path], bool] | None  # does this data look like the task's? (None: the fallback)


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    # Before detect: a folder of semantic masks (images/ + masks/, CamVid's
    # trainannot/) is not instance masks (PNGImages/ + PedMasks/: detect).
    TaskInfo("segment", "a class per pixel: images/ + masks/ label maps, the CamVid layout, or COCO masks (--task)",
             "imgclf.tasks.segment.task", lambda p: segment_format(p) is not None),
    TaskInfo("detect", "boxes of objects: Pascal VOC, COCO, YOLO labels or instance-mask PNGs",
             "imgclf.tasks.detect.task", lambda p: detect_format(p) is not None),
    TaskInfo("classify", "labels of whole images: class folders or a CSV of path,label",
             "imgclf.tasks.classify", None),
)}
CHOICES = ("auto", *TASKS)


def task_for_data(data: str | Path, task: str = "auto") -> str:
    """The task for this data: `task` when given, else the first whose
    sniffer recognises it, else classify."""
    if task != "auto":
        return checked(task)
    p = Path(data)
    for t in TASKS.values():
        if t.sniff is not None and p.exists() and t.sniff(p):
            return t.name
    return "classify"


def checked(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not a task imgclf knows", f"choose one of {', '.join(CHOICES)}")
    return task


def task_of(path: str | Path) -> str:
    """The task a run directory (its config.json) or a model file was made
    for. A model file says so itself (model.pt's record, an export's
    metadata): the verbs' `load` checks. Read here: a run directory, and an
    export's metadata (one more onnxruntime session, for `evaluate x.onnx`
    and `serve`); a model.pt is not opened (a second load of its weights)."""
    p = Path(path)
    cfg = p / "config.json"
    if p.is_dir() and cfg.is_file():
        try:
            return checked(json.loads(cfg.read_text()).get("task", "classify"))
        except (OSError, ValueError):
            return "classify"  # a damaged config is the classify loader's message to give
    if p.is_file() and model_format(p) in ("onnx", "ort"):  # `imgclf evaluate x.onnx DATA`, serve: its metadata
        return export_task(open_session(p))
    return "classify"


def export_task(session) -> str:
    """The task an exported .onnx/.ort was made for (its metadata's "task"; classify before tasks existed)."""
    task = session.get_modelmeta().custom_metadata_map.get("task", "classify")
    return task if task in TASKS else "classify"


def train(cfg: TrainConfig):
    """`imgclf train` and `imgclf.train`: the task from the data (or the run
    being resumed), recorded in the config, then that task's recipe."""
    cfg.task = task_of(cfg.out) if cfg.resume else task_for_data(cfg.data, cfg.task)
    return verbs(cfg.task).train(cfg)


def verbs(task: str) -> ModuleType:
    """The module with the task's verbs (train, evaluate, check, load, ...)."""
    return importlib.import_module(TASKS[checked(task)].verbs)


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | Path | None = None,
         threads: int | None = None):
    """Any run directory or model file -> the predictor for its task: a run
    (config.json's task) or its model.pt (the record's) through the task's
    own `load`; an exported .onnx/.ort by its metadata's "task", on the one
    session opened to read it (no torch); a .tflite (classify only)."""
    fmt = model_format(path)
    if fmt in ("onnx", "ort"):
        session = open_session(path, threads)
        task = export_task(session)
        if task == "detect":
            return OnnxDetPredictor(path, threads, session=session)
        if task == "segment":
            return OnnxSegPredictor(path, threads, session=session)
        return OnnxPredictor(path, threads, session=session)
    if fmt == "tflite":
        return LiteRTPredictor(path, threads=threads)
    return verbs(model_task(path)).load(path, device=device, engine=engine, cache_dir=cache_dir, threads=threads)


def model_task(path: str | Path) -> str:
    """The task of a run directory or a model.pt: the run's config.json, or
    (a model.pt on its own) the record's "task"."""
    run = RunDir(path)
    if run.config_file.is_file() or Path(path).is_dir():
        return task_of(run.path)
    return checked(torch_load(path).get("task", "classify"))
