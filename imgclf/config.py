"""The one training configuration. The CLI (`imgclf train --help`) is generated
from these fields, one flag per field, and the resolved config is saved in the
run directory and inside model.pt."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    data: str = _f("", "image folder (DATA/<class>/*, or DATA/train|val|test/<class>/*) or a CSV of path,label")
    out: str = _f("", "run directory for weights, splits, history, metrics (default: runs/<data name>, numbered if taken)")
    model: str = _f("efficientnet_lite0", "architecture, see `imgclf models`")
    pretrained: bool = _f(True, "start from ImageNet weights (--no-pretrained: random init)")
    weights: str | None = _f(None, "local backbone state dict (.pt/.pth) instead of the default pretrained weights")
    strategy: str = _f("auto", "auto | linear (frozen backbone, cached features) | finetune (head, then all layers) | scratch")
    epochs: int | None = _f(None, "maximum epochs of the main stage (default: 100 linear, 8 finetune, 30 scratch)")
    head_epochs: int = _f(30, "finetune: epochs of head-only training on cached features before unfreezing")
    time_budget: float | None = _f(None, "seconds: plan the stages to fit and return the best model found in time")
    image_size: int | None = _f(None, "input size in pixels (default: the model's own, e.g. 224)")
    resize: str | None = _f(None, "crop | squash | pad (default: the model's own, crop)")
    batch_size: int = _f(32, "images per step for image batches")
    feature_batch_size: int = _f(128, "examples per step when training a head on cached features")
    lr: float | None = _f(None, "peak learning rate of the head (default: 1e-3; 2e-3 for scratch)")
    backbone_lr_mult: float = _f(0.1, "finetune: backbone learning rate = lr x this (lower: keep what ImageNet taught)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_epochs: float = _f(1.0, "linear learning-rate warm-up before the cosine decay, in epochs")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    dropout: float = _f(0.2, "dropout before each head layer")
    head_hidden: tuple[int, ...] = _f((), "hidden fully connected layers of the head, e.g. 256,128")
    augment: str = _f("light", "image training augmentation: none | light (random resized crop + flip) | trivial | randaug")
    flip_features: bool = _f(True, "cached features: also cache each training image flipped (augmentation for free)")
    class_weights: str = _f("none", "none | auto (loss weights inversely proportional to class frequency)")
    balanced_sampler: bool = _f(False, "draw training batches with equal class probability")
    val_fraction: float = _f(0.1, "share of each class held out for validation when the data has no split")
    test_fraction: float = _f(0.1, "share of each class held out for testing when the data has no split")
    seed: int = _f(0, "seed for the split, initialisation and shuffling")
    patience: int | None = _f(None, "early stopping: epochs without improvement (default: 15 on features, 3 on images)")
    monitor: str = _f("acc", "validation metric for early stopping and the best model: acc | balanced_acc | loss")
    workers: int | None = _f(None, "data-loading processes (default: half the cores)")
    device: str = _f("auto", "auto | cpu | cuda")
    engine: str = _f("auto", "frozen feature extraction: auto (onnxruntime on CPU) | torch | onnxruntime")
    cache: bool = _f(True, "cache frozen-backbone features on disk (--no-cache: recompute)")
    cache_dir: str | None = _f(None, "feature cache folder (default: $XDG_CACHE_HOME/imgclf or ~/.cache/imgclf)")
    resume: bool = _f(False, "continue the interrupted run in --out from its last checkpoint")
    tensorboard: bool = _f(False, "also log to RUN/tensorboard (needs `pip install tensorboard`)")
    evaluate: bool = _f(True, "evaluate on the test split (or val) when training ends")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # fields from newer versions are ignored
        if "head_hidden" in d:
            d["head_hidden"] = tuple(d["head_hidden"] or ())
        return cls(**d)

    def validate(self) -> None:
        from .models import MODELS
        from .preprocess import AUGMENTS, RESIZE_POLICIES

        checks = [
            (self.model in MODELS, f"--model {self.model!r} is unknown; choose one of {', '.join(MODELS)}"),
            (self.strategy in ("auto", "linear", "finetune", "scratch"), f"--strategy {self.strategy!r}: use auto, linear, finetune or scratch"),
            (self.augment in AUGMENTS, f"--augment {self.augment!r}: use one of {', '.join(AUGMENTS)}"),
            (self.resize in (None, *RESIZE_POLICIES), f"--resize {self.resize!r}: use crop, squash or pad"),
            (self.class_weights in ("none", "auto"), f"--class-weights {self.class_weights!r}: use none or auto"),
            (self.monitor in ("acc", "balanced_acc", "loss"), f"--monitor {self.monitor!r}: use acc, balanced_acc or loss"),
            (self.engine in ("auto", "torch", "onnxruntime"), f"--engine {self.engine!r}: use auto, torch or onnxruntime"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device {self.device!r}: use auto, cpu or cuda"),
            (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
             "--val-fraction and --test-fraction must be in [0, 1) and leave images for training"),
            (self.batch_size > 0 and self.feature_batch_size > 0, "--batch-size must be positive"),
            (self.image_size is None or self.image_size >= 16, "--image-size must be at least 16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
