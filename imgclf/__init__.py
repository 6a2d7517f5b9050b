"""imgclf: from a folder of labelled images to a trained, evaluated, exported
and served CNN image classifier.

    import imgclf
    result = imgclf.train(data="photos", out="runs/photos")
    clf = imgclf.load("runs/photos")
    clf.predict(["cat.jpg"])
"""

import os
from dataclasses import replace

from imgclf import tasks
from imgclf._version import __version__
from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError

# onnxruntime's Linux builds record an event per session (a persistent device
# id, the process path, OS and CPU) in ~/.cache/Microsoft/DeveloperTools/
# .onnxruntime/onnxruntime.db. disable_telemetry_events() does not stop it;
# this variable does, when set before onnxruntime is first imported, which no
# module does at import time (tests/test_hardening.py::test_onnxruntime_writes_no_telemetry).
# A user's own value is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

load = tasks.load  # any run directory or model file, of any task: the predictor for it

__all__ = ["train", "load", "TrainConfig", "ImgclfError", "__version__"]


def train(config: TrainConfig | None = None, **overrides):
    """Train a classifier or a detector (the task from the data, or `task=`);
    see `imgclf.TrainConfig` for the settings."""
    cfg = replace(config or TrainConfig(), **overrides)
    return tasks.train(cfg)
