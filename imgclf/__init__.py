"""imgclf: from a folder of labelled images to a trained, evaluated, exported
and served CNN image classifier.

    import imgclf
    result = imgclf.train(data="photos", out="runs/photos")
    clf = imgclf.load("runs/photos")
    clf.predict(["cat.jpg"])
"""

__version__ = "0.1.0"

__all__ = ["train", "load", "TrainConfig", "__version__"]


def train(config=None, **overrides):
    """Train a classifier; see `imgclf.TrainConfig` for the settings."""
    from .train import train as _train

    return _train(config, **overrides)


def load(path, **kw):
    """A trained classifier from a run directory or model file; `.predict()` it."""
    from .predict import load as _load

    return _load(path, **kw)


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(name)
