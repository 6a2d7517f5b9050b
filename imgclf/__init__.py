"""imgclf: from a folder of labelled images to a trained, evaluated, exported
and served CNN image classifier.

    import imgclf
    result = imgclf.train(data="photos", out="runs/photos")
    clf = imgclf.load("runs/photos")
    clf.predict(["cat.jpg"])
"""

from imgclf._version import __version__
from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError
from imgclf.inference.load import load

__all__ = ["train", "load", "TrainConfig", "ImgclfError", "__version__"]


def train(config: TrainConfig | None = None, **overrides):
    """Train a classifier; see `imgclf.TrainConfig` for the settings."""
    from imgclf.training.train import train as _train  # deferred: torch; `import imgclf` serves .onnx without it

    return _train(config, **overrides)
