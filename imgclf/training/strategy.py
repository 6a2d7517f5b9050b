"""Which strategy `imgclf train` takes, and why, and the settings it writes
into the run's config: `auto` picks by the images (small ones train natively
or race, race.py), the model (pretrained or not) and the hardware (GPU:
fine-tune; CPU: a head on cached features); a chosen strategy is checked
(a pretrained backbone, the in-memory budget).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from imgclf.config import TrainConfig
from imgclf.data.datasets import Splits
from imgclf.data.loading import ImageLook
from imgclf.errors import ConfigError
from imgclf.models.registry import SmallCNN, get_model_info
from imgclf.training.distributed import Dist
from imgclf.training.epochs import say
from imgclf.training.stage_network import LOWRES_SIZE, check_memory_budget


def choose_strategy(cfg: TrainConfig, device: torch.device, look: ImageLook | None = None,
                    n_train: int = 0) -> tuple[str, str]:
    """The fastest path to a good model for these images, model and hardware, and why."""
    info = get_model_info(cfg.model)
    pretrained = info.pretrained and (cfg.pretrained or cfg.weights)
    if cfg.strategy == "lowres":  # before the generic branch: it has its own checks
        if not pretrained:
            raise ConfigError(f"--strategy lowres fine-tunes a pretrained backbone; {cfg.model} has none here",
                              "use --strategy native, or drop --no-pretrained")
        check_native_fits(replace(cfg, image_size=cfg.decode_size), look, n_train)
        return cfg.strategy, "chosen with --strategy"
    if cfg.strategy != "auto":
        if cfg.strategy in ("linear", "finetune") and not pretrained:
            raise ConfigError(f"--strategy {cfg.strategy} needs a pretrained backbone; {cfg.model} has none here",
                              "use --strategy scratch, or drop --no-pretrained")
        if cfg.strategy == "native":
            check_native_fits(cfg, look, n_train)
        return cfg.strategy, "chosen with --strategy"
    small = native_reason(cfg, look, n_train)
    if small and pretrained and race_fits(cfg, look):
        kind = "grayscale images" if look.grey >= 0.9 else "small colour images"
        return "race", (f"{kind} ({look.describe()}): no size rule holds on them, so linear, native and lowres "
                        f"race on a sample and the best held-out score trains in full")
    if small:
        return "native", small + (" (grayscale: no race; --race on races them)" if cfg.race == "auto" else "")
    if not pretrained:
        return "scratch", f"{cfg.model} has no pretrained weights in use, so every layer is trained"
    if device.type == "cuda":
        return "finetune", "GPU: fine-tuning every layer is affordable and usually the most accurate"
    if cfg.time_budget:
        return "linear+finetune", (f"CPU with --time-budget {cfg.time_budget:g}s: a head on cached features first, "
                                   "then fine-tuning for as long as the budget allows")
    return "linear", ("CPU: the frozen backbone's features are computed once and cached, so the head trains in "
                      "seconds; full fine-tuning recomputes them every epoch (about 10x slower per epoch)")


def strategy_for_run(cfg: TrainConfig, device: torch.device, look: ImageLook | None, splits: Splits,
                     dist: Dist) -> tuple[str, str]:
    """choose_strategy for this run: a race needs one process and single-label data, else native."""
    strategy, why = choose_strategy(cfg, device, look, len(splits.train))
    if strategy == "race" and (dist.enabled or splits.multi_label):
        return "native", (f"{native_reason(cfg, look, len(splits.train))} (no race with several processes or "
                          f"multi-label data)")
    return strategy, why


# `auto` trains small images natively: upscaling a 28 px digit for an ImageNet
# backbone costs 16-64x the pixels and scored 93.8% (112 px) on the demo's
# MNIST digits, where small_cnn at 28 px scored 99.4% (docs/benchmarks.md).
NATIVE_MAX_SIDE = 64  # any image up to this size (90th percentile of the longer side)
NATIVE_GREY_MAX_SIDE = 128  # grayscale (scans, drawings, digits) up to this size, trained at 64 px
NATIVE_GREY_ERASE = 0.0  # random erasing on grayscale native runs: off, no gain on val (docs/benchmarks.md)


def native_size(cfg: TrainConfig, look: ImageLook | None) -> int:
    """--image-size, else the images' own size (at most 64 px)."""
    return cfg.image_size or (max(SmallCNN.MIN_SIDE, min(look.side, NATIVE_MAX_SIDE)) if look else NATIVE_MAX_SIDE)


def native_reason(cfg: TrainConfig, look: ImageLook | None, n_train: int) -> str | None:
    """Why `auto` trains these images natively, or None (photos: today's defaults)."""
    if look is None or cfg.model not in (TrainConfig().model, "small_cnn"):
        return None  # another model was asked for: its own strategy
    grey = look.grey >= 0.9
    if not (look.side <= NATIVE_MAX_SIDE or (grey and look.side <= NATIVE_GREY_MAX_SIDE)):
        return None
    size = native_size(cfg, look)
    over = check_memory_budget(n_train, size)
    if over:
        say(f"note: images are small ({look.describe()}), but {n_train} of them decoded at {size}px need "
            f"{over:.0f} MB, above the in-memory budget (raise IMGCLF_IMAGES_IN_MEMORY_MB, in MB, to train them "
            f"natively); keeping the usual strategy")
        return None
    kind = "grayscale images" if grey else "small images"
    return (f"{kind} ({look.describe()}): small_cnn trained from scratch at {size}px, decoded once into memory, "
            f"instead of upscaling to 224px for a frozen ImageNet backbone (--strategy linear keeps that)")


def check_native_fits(cfg: TrainConfig, look: ImageLook | None, n_train: int) -> None:
    size = native_size(cfg, look)
    over = check_memory_budget(n_train, size)
    if over:
        raise ConfigError(f"--strategy native keeps the {n_train} training images decoded in memory: {over:.0f} MB "
                          f"at {size}px, above the budget", "set a smaller --image-size, raise "
                          "IMGCLF_IMAGES_IN_MEMORY_MB (megabytes), or use --strategy scratch (streams from disk)")


def race_fits(cfg: TrainConfig, look: ImageLook | None) -> bool:
    """Race where candidates genuinely compete: small colour images (--race on:
    any small images), on the default backbone, in a single-label run."""
    if cfg.race == "off" or look is None or cfg.model != TrainConfig().model:
        return False
    return cfg.race == "on" or look.grey < 0.9


def no_race_reason(cfg: TrainConfig, look: ImageLook | None) -> str:
    """Why this run did not race (summary.json)."""
    if cfg.strategy not in ("auto",) and not cfg.resume:
        return f"--strategy {cfg.strategy} was given"
    if cfg.race == "off":
        return "--race off"
    if look is None:
        return "resumed, or no image header could be read: the strategy was fixed already"
    if look.side > NATIVE_MAX_SIDE and not (look.grey >= 0.9 and look.side <= NATIVE_GREY_MAX_SIDE):
        return (f"photos ({look.describe()}): the frozen backbone's cached features are the measured default here, "
                f"and a race would only add time")
    return "small grayscale images train natively (--race on races them)" if look.grey >= 0.9 else \
        "the race needs the default pretrained backbone and a single-label run on one process"


def strategy_settings(cfg: TrainConfig, strategy: str, look: ImageLook | None, fix: bool) -> TrainConfig:
    """The chosen strategy's settings, written into the config; fix: the
    race chose it, so --resume and --from keep it rather than race again."""
    if cfg.flip_features is None:  # auto: mirrored features doubled the encoding for no gain (benchmarks.md)
        cfg = replace(cfg, flip_features=strategy in ("native", "lowres"))
    if strategy == "native":
        return native_settings(cfg, look)
    if strategy == "lowres":
        return lowres_settings(cfg, look)
    return replace(cfg, strategy=strategy) if fix else cfg


def lowres_settings(cfg: TrainConfig, look: ImageLook | None) -> TrainConfig:
    """lowres's defaults, written into the config as native's are: decoded at
    the images' own size (at most 64 px), upscaled per batch to 128 px and
    squashed there (as prediction resizes a file), batches of 64, flips for
    colour images only."""
    decode = cfg.decode_size or native_size(replace(cfg, image_size=None), look)
    size = cfg.lowres_size or LOWRES_SIZE
    flip = bool(cfg.flip_features) and (look is None or look.grey < 0.5)
    return replace(cfg, strategy="lowres", image_size=size, lowres_size=size, decode_size=decode, resize="squash",
                   crop_pct=1.0, batch_size=64 if cfg.batch_size == TrainConfig().batch_size else cfg.batch_size,
                   flip_features=flip)


def native_settings(cfg: TrainConfig, look: ImageLook | None) -> TrainConfig:
    """The native strategy's defaults, written into the config (config.json, and
    so --resume and --from) so the run is fixed once chosen: small_cnn unless
    another from-scratch model was asked for, the images' own size, batches of
    128 (small images: larger batches use the cores better), flips only for
    colour images (digits and letters change meaning when mirrored)."""
    model = cfg.model if not get_model_info(cfg.model).pretrained or not cfg.pretrained else "small_cnn"
    flip = cfg.flip_features and (look is None or look.grey < 0.5)
    if cfg.flip_features and not flip:
        say("native: grayscale images are not mirrored in training: digits and letters change meaning")
    grey = look is not None and look.grey >= 0.9
    return replace(cfg, strategy="native", model=model, pretrained=False,
                   image_size=native_size(cfg, look),
                   batch_size=128 if cfg.batch_size == TrainConfig().batch_size else cfg.batch_size,
                   flip_features=flip, erase=cfg.erase if cfg.erase is not None else NATIVE_GREY_ERASE * grey)
