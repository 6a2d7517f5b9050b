"""imgclf: from a folder of labelled images to a trained, evaluated, exported
and served CNN image classifier.

    import imgclf
    result = imgclf.train(data="photos", out="runs/photos")
    clf = imgclf.load("runs/photos")
    clf.predict(["cat.jpg"])
"""

import os as _os

# onnxruntime's Linux builds record an event per session (a persistent device
# id, the process path, OS and CPU) in ~/.cache/Microsoft/DeveloperTools/
# .onnxruntime/onnxruntime.db. disable_telemetry_events() does not stop it;
# this variable does, when set before onnxruntime is first imported
# (tests/test_hardening.py::test_onnxruntime_writes_no_telemetry). A user's own value is kept.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

__all__ = ["train", "load", "TrainConfig", "ImgclfError", "__version__"]


def train(config=None, **overrides):
    """Train a classifier; see `imgclf.TrainConfig` for the settings."""
    from imgclf.training.train import train as _train

    return _train(config, **overrides)


def load(path, **kw):
    """A trained classifier from a run directory, model.pt or exported .onnx;
    `.predict()` it (see imgclf.inference.Predictor)."""
    from imgclf.inference import load as _load

    return _load(path, **kw)


def __getattr__(name):
    if name == "TrainConfig":
        from imgclf.config import TrainConfig

        return TrainConfig
    if name == "ImgclfError":
        from imgclf.errors import ImgclfError

        return ImgclfError
    raise AttributeError(name)
