"""One dataclass per command. The CLI is generated from them (cli.py): one
flag per field, its help from the field's comment, positional arguments where
the field says so. TrainConfig, resolved, is saved in the run directory and
inside model.pt. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from imgclf.data.preprocess import AUGMENTS, RESIZE_POLICIES
from imgclf.errors import ConfigError


def _f(default, help: str, **kw):
    """A field with its CLI help; kw: positional="?"|"+"|"*"|1 (an argument, not a
    flag), choices=(...) (argparse checks them), flag="--name" (instead of the
    field's name), short="-k" (a one-letter alias)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    data: str = _f("", "image folder (DATA/<class>/*, or DATA/train|val|test/<class>/*) or a CSV of path,label",
                   positional="?")
    out: str = _f("", "run directory for weights, splits, history, metrics (default: runs/<data name>, numbered if taken)")
    task: str = _f("auto", "auto (from the data: VOC, COCO, YOLO labels or instance masks mean detect; images/ + "
                           "masks/ or CamVid's train/ + trainannot/ segment; class folders and CSVs classify) | "
                           "classify | detect | segment")
    model: str = _f("efficientnet_lite1", "architecture, see `imgclf models` (detect: the backbone; "
                                          "efficientnet_lite0 unless given)")
    pretrained: bool = _f(True, "start from ImageNet weights (--no-pretrained: random init)")
    weights: str | None = _f(None, "local backbone state dict (.pt/.pth) instead of the default pretrained weights")
    strategy: str = _f("auto", "auto | linear (frozen backbone, cached features) | finetune (head, then all layers) | scratch "
                                 "| native (small images: small_cnn at their own size, decoded once into memory) "
                                 "| lowres (small images: the pretrained backbone fine-tuned at --lowres-size)")
    epochs: int | None = _f(None, "maximum epochs of the main stage (default: 100 linear, 8 finetune, 30 scratch, "
                                               "14 native)")
    head_epochs: int = _f(30, "finetune: epochs of head-only training on cached features before unfreezing")
    time_budget: float | None = _f(None, "seconds: plan the stages to fit and return the best model found in time")
    image_size: int | None = _f(None, "input size in pixels (default: the model's own, e.g. 224)")
    resize: str | None = _f(None, "crop | squash | pad (default: the model's own, crop)")
    crop_pct: float | None = _f(None, "--resize crop: the share of the resized image kept around its centre (timm's "
                                      "crop_pct; default: the model's own: 208/240 for Lite1, 1 for the others)")
    batch_size: int = _f(32, "images per step for image batches (detect: 4 unless given); under torchrun per process (the global batch "
                             "is this x the number of processes)")
    feature_batch_size: int = _f(128, "examples per step when training a head on cached features")
    lr: float | None = _f(None, "peak learning rate of the head (default: 1e-3; 2e-3 for scratch)")
    freeze_bn: bool = _f(True, "finetune: batch norm keeps the pretrained running statistics (Keras's advice "
                               "for fine-tuning; they still learn scale and shift); --no-freeze-bn updates them")
    backbone_lr_mult: float = _f(0.1, "finetune: backbone learning rate = lr x this (lower: keep what ImageNet taught)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_epochs: float = _f(1.0, "linear learning-rate warm-up before the cosine decay, in epochs")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    dropout: float = _f(0.2, "dropout before each head layer")
    head_hidden: tuple[int, ...] = _f((), "hidden fully connected layers of the head, e.g. 256,128")
    head_fit: str = _f("auto", "how the head learns on cached features: cv (L-BFGS logistic regression, its L2 strength "
                               "chosen by k-fold cross-validation on train, so val chooses nothing) | epochs (AdamW "
                               "epochs early-stopped on val) | auto (cv for a linear head, epochs with --head-hidden)",
                       choices=("auto", "cv", "epochs"))
    search: int = _f(0, "N Optuna trials (TPE, pruning) of the head's settings on the cached features, each scored "
                        "by k-fold cross-validation on train, never val; the best becomes the head, every trial goes "
                        "to RUN/search.csv")
    cv_folds: int = _f(5, "folds of the cross-validation that chooses the head's settings (--head-fit cv, --search)")
    augment: str = _f("light", "image training augmentation: none | light (random resized crop + flip) | trivial | randaug")
    flip_features: bool | None = _f(None, "mirror training images: cached features also cache each image flipped; "
                                          "native: random flips, colour images only (default: on for native, off "
                                          "for cached features, where it doubled the encoding for no measured gain)")
    class_weights: str | None = _f(None, "none | auto (loss weights inversely proportional to class frequency; "
                                         "default: none, segment: auto, median frequency)")
    balanced_sampler: bool = _f(False, "draw training batches with equal class probability")
    val_fraction: float = _f(0.1, "share of each class held out for validation when the data has no split")
    test_fraction: float = _f(0.1, "share of each class held out for testing when the data has no split")
    seed: int = _f(0, "seed for the split, initialisation and shuffling")
    patience: int | None = _f(None, "early stopping: epochs without improvement (default: 15 on features, 3 on images)")
    monitor: str = _f("acc", "validation metric for early stopping and the best model: acc | balanced_acc | loss "
                                "(multi-label: mAP unless loss)")
    workers: int | None = _f(None, "data-loading processes (default: half the cores)")
    device: str = _f("auto", "auto | cpu | cuda")
    nproc_per_node: int = _f(1, "processes on this machine (one per GPU): hands the command to torchrun "
                                "(torch.distributed.run --standalone); for several machines call torchrun "
                                "yourself, see docs/scaling.md")
    sync_bn: bool = _f(False, "distributed on CUDA: synchronise batch-norm statistics across GPUs (SyncBatchNorm), "
                              "for small per-GPU batches")
    engine: str = _f("auto", "frozen feature extraction: auto (onnxruntime on CPU) | torch | onnxruntime")
    cache: bool = _f(True, "cache frozen-backbone features on disk (--no-cache: recompute)")
    cache_dir: str | None = _f(None, "feature cache folder (default: $XDG_CACHE_HOME/imgclf or ~/.cache/imgclf)")
    resume: bool = _f(False, "continue the interrupted run in --out from its last checkpoint")
    from_run: str | None = _f(None, "start from an earlier run: its settings (flags given here win), its backbone, its "
                                    "split for the files it had, and its feature cache, so only new files are encoded",
                              flag="--from")
    log: str = _f("", "also track the run in: tensorboard (event files in RUN/tensorboard) | mlflow (the store at "
                      "MLFLOW_TRACKING_URI, else sqlite under RUN) | tensorboard,mlflow; needs "
                      "pip install 'imgclf[tensorboard]' / 'imgclf[mlflow]'")
    tensorboard: bool = _f(False, "same as --log tensorboard")
    evaluate: bool = _f(True, "evaluate on the test split (or val) when training ends")
    multi_label: bool = _f(False, "several labels per image: sigmoid outputs, per-label thresholds (automatic for a "
                                  "CSV with a 'labels' header or ';'-separated labels)")
    follow_links: bool = _f(False, "follow symbolic links that lead outside the data folder (files and folders); "
                                   "without it they are skipped and listed")
    threshold: float | None = _f(None, "multi-label: one decision threshold for every label (default: per label, "
                                       "tuned on val for the best F1)")
    reject: str = _f("off", "answer 'unknown' for inputs unlike the training images: auto (keeps 95%% of known "
                            "validation images), a threshold in (0, 1] on the unknown score, or off (the score is "
                            "still returned); stored with the model")
    ignore_index: int = _f(255, "segment: the mask value that marks void pixels, neither trained on nor scored "
                                "(CamVid: 11)")
    race: str = _f("auto", "how `auto` picks on small images: auto (a short race between linear, native and lowres "
                           "on small colour images; grayscale ones train natively) | on (race on any small images) "
                           "| off (the size rule alone); photos above 64 px never race", choices=("auto", "on", "off"))
    race_images: int = _f(1000, "training images (a stratified sample) each strategy in the race learns from")
    race_seconds: float = _f(240, "the race's time budget for training its candidates; when it runs out the best "
                                  "score so far wins")
    lowres_size: int | None = _f(None, "lowres: the input size the pretrained backbone is fine-tuned at (default 128, chosen on val)")
    decode_size: int | None = _f(None, "lowres: the size training images are decoded at and kept in memory before "
                                       "each batch is upscaled (default: their own, at most 64 px)")
    erase: float | None = _f(None, "native and lowres: share of training images given a random erased rectangle "
                                   "(random erasing; default off: it measured no gain on val)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # fields from newer versions are ignored
        if "head_hidden" in d:
            d["head_hidden"] = tuple(d["head_hidden"] or ())
        return cls(**d)

    def validate(self) -> None:
        from imgclf.models.registry import MODELS  # deferred: the registry imports torch; `imgclf --help` must not

        checks = [
            (self.model in MODELS, f"--model {self.model!r} is unknown; choose one of {', '.join(MODELS)}"),
            (self.strategy in ("auto", "linear", "finetune", "scratch", "native", "lowres"),
             f"--strategy {self.strategy!r}: use auto, linear, finetune, scratch, native or lowres"),
            (self.race_images >= 20 and self.race_seconds > 0,
             f"--race-images {self.race_images} / --race-seconds {self.race_seconds}: use at least 20 images and "
             f"a positive budget"),
            (self.lowres_size is None or 32 <= self.lowres_size <= 224,
             f"--lowres-size {self.lowres_size}: use 32-224 px (64-128 is the usual range)"),
            (self.erase is None or 0 <= self.erase <= 1, f"--erase {self.erase}: use a share in [0, 1]"),
            (self.augment in AUGMENTS, f"--augment {self.augment!r}: use one of {', '.join(AUGMENTS)}"),
            (self.resize in (None, *RESIZE_POLICIES), f"--resize {self.resize!r}: use crop, squash or pad"),
            (self.class_weights in (None, "none", "auto"), f"--class-weights {self.class_weights!r}: use none or auto"),
            (self.monitor in ("acc", "balanced_acc", "loss"), f"--monitor {self.monitor!r}: use acc, balanced_acc or loss"),
            (self.engine in ("auto", "torch", "onnxruntime"), f"--engine {self.engine!r}: use auto, torch or onnxruntime"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device {self.device!r}: use auto, cpu or cuda"),
            (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
             "--val-fraction and --test-fraction must be in [0, 1) and leave images for training"),
            (self.batch_size > 0 and self.feature_batch_size > 0, "--batch-size must be positive"),
            (self.search >= 0, f"--search {self.search}: give a number of trials (0: no search)"),
            (not (self.search and self.strategy in ("scratch", "native")),
             f"--search tunes a head on cached features; --strategy {self.strategy} has none (use linear or auto)"),
            (all(s.strip() in ("tensorboard", "mlflow", "") for s in self.log.split(",")),
             f"--log {self.log!r}: use tensorboard, mlflow or tensorboard,mlflow"),
            (self.cv_folds >= 2, f"--cv-folds {self.cv_folds}: use 2 or more (5 is usual)"),
            (not (self.head_fit == "cv" and self.head_hidden),
             "--head-fit cv fits a linear head; with --head-hidden use --head-fit epochs (or auto)"),
            (self.nproc_per_node >= 1, f"--nproc-per-node {self.nproc_per_node}: use 1 or more"),
            (self.image_size is None or self.image_size >= 16, "--image-size must be at least 16"),
            (self.crop_pct is None or 0.25 <= self.crop_pct <= 1, f"--crop-pct {self.crop_pct}: use a share in "
                                                                   f"[0.25, 1] (1 keeps the whole resized image)"),
            (self.threshold is None or 0 < self.threshold < 1, "--threshold must be in (0, 1)"),
            (_valid_reject(self.reject), f"--reject {self.reject!r}: use auto, off or a number in (0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


def _valid_reject(v) -> bool:
    try:
        return v in ("auto", "off") or 0 < float(v) <= 1
    except (TypeError, ValueError):
        return False


@dataclass
class RuntimeConfig:
    """Where a run's model runs: shared by the commands that load one."""

    device: str = _f("auto", "auto | cpu | cuda")
    engine: str = _f("auto", "feature extraction: auto | torch | onnxruntime")
    cache_dir: str | None = _f(None, "feature cache folder")


@dataclass
class EvaluateConfig(RuntimeConfig):
    run: str = _f("", "run directory (a segmenter's exported .onnx or .ort too: results in <file>-eval/)",
                  positional=1)
    data: str | None = _f(None, "data root (default: the one recorded in the run)", positional="?")
    split: str | None = _f(None, "split to evaluate (default: test, else val)", choices=("test", "val", "train"))
    tta: str = _f("none", "test-time augmentation: flip averages with the mirrored image (the report shows both)",
                  choices=("none", "flip"))
    calibrate: bool = _f(False, "refit the temperature (multi-label: the per-label thresholds) on val and store it "
                                "in model.pt (training already does; for runs made before it did)")
    report: bool = _f(True, "write RUN/report/index.html and RUN/report/eval.json")
    suspects: bool = _f(True, "report training images whose label looks wrong (out-of-fold)")
    gradcam: bool = _f(True, "Grad-CAM heatmaps for a few predictions in the report")
    map: bool = _f(True, "a 2-D map of the images in the report (t-SNE of the embeddings; hover shows each image)")
    cache: bool = _f(True, "read and write the feature cache (--no-cache: compute every feature afresh)")
    unknown: str | None = _f(None, "a folder of images from none of the classes: adds the unknown-input section "
                                   "(AUROC, acceptance/rejection trade-off) to the report")


@dataclass
class CompareConfig(RuntimeConfig):
    runs: list = _f([], "run directories", positional="+")
    split: str | None = _f(None, "split (default: each run's held-out split)", choices=("test", "val"))
    json: bool = _f(False, "machine-readable output")


@dataclass
class PredictConfig(RuntimeConfig):
    run: str = _f("", "run directory, model.pt, or an exported .onnx or .ort", positional=1)
    paths: list = _f([], "image files or folders", positional="+")
    top_k: int = _f(3, "labels per image")
    format: str = _f("table", "output format", choices=("table", "json", "csv"))
    batch_size: int = _f(32, "images per model call")
    reject: str | None = _f(None, "override the model's rejection of unknown inputs: auto, off, or a threshold "
                                  "in (0, 1] on the unknown score")
    conf: float | None = _f(None, "detect: one score threshold for every class (default: each class's F1-optimal "
                                  "threshold, chosen on val at training time)")
    save_images: str | None = _f(None, "detect: write each image with its boxes drawn into this folder")
    save_masks: str | None = _f(None, "segment: write each image's label map (PNG, class ids) and a colour overlay "
                                      "into this folder")


@dataclass
class EmbedConfig(RuntimeConfig):
    inputs: list = _f([], "a dataset (folder or CSV, as for train: labels and splits kept) or image files and "
                          "folders (default with --run: the run's own images)", positional="*")
    out: str = _f("", "FILE.parquet (path, label, split, embedding) or FILE.npy (+ FILE.csv: row, path, label, split)")
    run: str | None = _f(None, "embed with this run's own backbone (fine-tuned or not); labels and splits of its files")
    model: str | None = _f(None, "embed with a pretrained model's backbone instead (default: efficientnet_lite0)")
    labels: bool = _f(True, "read one folder or CSV as a labelled dataset (--no-labels: as plain image files)")
    val_fraction: float = _f(0.1, "as for train: the split of a dataset without split folders")
    test_fraction: float = _f(0.1, "as for train: the split of a dataset without split folders")
    seed: int = _f(0, "as for train: the split's seed")
    batch_size: int = _f(32, "images per model call")
    workers: int = _f(1, "image-decoding processes")
    cache: bool = _f(True, "read and write the feature cache")


@dataclass
class SimilarConfig(RuntimeConfig):
    run: str = _f("", "run directory (its training images are searched)", positional=1)
    images: list = _f([], "query image files or folders", positional="+")
    k: int = _f(10, "neighbours per image", short="-k")
    format: str = _f("table", "output format", choices=("table", "json"))


@dataclass
class SuggestConfig(RuntimeConfig):
    run: str = _f("", "run directory", positional=1)
    unlabeled: str = _f("", "folder of unlabeled images", positional=1)
    n: int = _f(50, "how many images to suggest", short="-n")
    out: str = _f("to_label.csv", "CSV to write: path, label (empty, to fill in), rank, predicted, scores, why")
    uncertainty: str = _f("margin", "margin (1 - gap between the two best probabilities) or entropy",
                          choices=("margin", "entropy"))
    batch_size: int = _f(32, "images per model call")
    workers: int = _f(1, "image-decoding processes")


@dataclass
class CheckConfig:
    data: str = _f("", "image folder or CSV, or detection labels (VOC, COCO, YOLO, instance masks), as for "
                       "`imgclf train`", positional=1)
    task: str = _f("auto", "as for train: auto (from the data) | classify | detect | segment")
    image_size: int | None = _f(None, "detect: the input size the small-object warning is judged at (default: "
                                      "the one train would choose from the boxes)")
    json: bool = _f(False, "machine-readable output")
    val_fraction: float = _f(0.1, "as for train: share held out for validation when the data has no split")
    test_fraction: float = _f(0.1, "as for train: share held out for testing when the data has no split")
    seed: int = _f(0, "as for train: the split's seed")
    near_dup: str = _f("auto", "near-duplicate search, every pair verified by its pixels: hash (perceptual hashes "
                               "of each image, its mirror and crops; no model) | embed (hash or backbone "
                               "embeddings: finds heavier edits too; fills the feature cache `train` reads) | "
                               "auto (embed where the features are already cached, else hash) | off",
                       choices=("auto", "hash", "embed", "off"))
    model: str = _f("efficientnet_lite0", "--near-dup embed/auto: the pretrained backbone that embeds the images")
    cache_dir: str | None = _f(None, "feature cache folder (default: $IMGCLF_CACHE_DIR, else ~/.cache/imgclf)")
    fix: bool = _f(False, "write a cleaned split as a CSV for `imgclf train`: one image per group of copies, leaks "
                          "dropped from val/test, conflicting labels left out for you to decide; your files are "
                          "never changed")
    fix_out: str | None = _f(None, "--fix: the CSV to write (default: next to the data, DATA_clean.csv)")
    max_drop: float = _f(0.05, "--fix: most share of the images the cleaned split may leave out; over it, the "
                               "list is reported and nothing is written unless --force")
    force: bool = _f(False, "--fix: write the cleaned split even when it leaves out more than --max-drop")
    follow_links: bool = _f(False, "as for train: follow symbolic links that lead outside the data folder")
    ignore_index: int = _f(255, "segment: as for train: the mask value that marks void pixels (CamVid: 11)")


@dataclass
class ModelsConfig:
    pass


@dataclass
class CacheConfig:
    action: str = _f("info", "info: what is cached; clear: empty it", positional=1, choices=("info", "clear"))
    cache_dir: str | None = _f(None, "feature cache folder (default: $IMGCLF_CACHE_DIR, else ~/.cache/imgclf)")


@dataclass
class ExportConfig:
    run: str = _f("", "run directory or model.pt", positional=1)
    format: str = _f("onnx", "file format: onnx; ort (ONNX Runtime Mobile, for apps); torchscript; "
                             "tflite (LiteRT, for Android; needs imgclf[mobile]); "
                             "web (a static folder that classifies in the browser, offline)",
                     choices=("onnx", "ort", "torchscript", "tflite", "web"))
    out: str | None = _f(None, "output file (default: RUN/model.onnx, model.int8.onnx, model.ort, model.int8.ort, "
                               "model.torchscript.pt, model.tflite, model.int8.tflite), or folder for web "
                               "(default: RUN/web)")
    int8: bool = _f(False, "INT8: static for onnx/ort (onnxruntime, calibrated on training images), dynamic-range "
                           "for tflite; reports accuracy change, top-1 agreement with fp32 and speed, refused over "
                           "--max-drop or under --min-agreement")
    max_drop: float = _f(1.0, "refuse an INT8 model whose validation accuracy drops by more points than this")
    min_agreement: float = _f(0.99, "refuse an INT8 model whose top-1 answer matches fp32's on a smaller share of "
                                    "validation images than this")
    force: bool = _f(False, "write the INT8 model even over --max-drop or under --min-agreement")
    calib_images: int = _f(100, "training images for INT8 calibration")
    check_images: int = _f(32, "validation images for the PyTorch parity check")
    any_size: bool = _f(False, "onnx/ort: put the resize inside the graph, for apps: uint8 RGB images of any size "
                               "in (the decoded photo), written as model.any-size.onnx/.ort; checked against "
                               "Pillow's resize. `imgclf predict`/`serve` take the plain export")
    json: bool = _f(False, "print the export report as JSON")
    reject: str | None = _f(None, "bake another rejection of unknown inputs into the file's `rejected` output: "
                                  "auto, off, or a threshold in (0, 1] (default: the run's)")


@dataclass
class ServeConfig:
    model: str = _f("", "an .onnx or .ort from `imgclf export` (no torch needed) or a run directory", positional=1)
    host: str = _f("127.0.0.1", "0.0.0.0 to listen on every interface")
    port: int = _f(8000, "TCP port")
    workers: int = _f(1, "server processes (each loads the model)")
    max_batch: int = _f(32, "most images per model call (micro-batching)")
    batch_wait_ms: float = _f(5.0, "how long a batch waits for more images")
    api_key: str | None = _f(None, "require this key on /v1/* (X-API-Key or Authorization: Bearer); "
                                   "or set IMGCLF_API_KEY")
    max_body_mb: float = _f(20.0, "largest request body, MiB")
    max_files: int = _f(16, "most images per request")
    max_pixels: int = _f(40_000_000, "largest decoded image, pixels (a 12 MP photo is far below)")
    top_k: int = _f(5, "labels per image unless the request says otherwise")
    threads: int | None = _f(None, "onnxruntime threads (default: all cores / workers)")
    max_concurrent: int = _f(64, "requests being parsed, decoded or classified at once; more get 503 busy")
    decode_budget_mb: float | None = _f(None, "memory that decoding images may take at once across all requests, "
                                              "MiB, as imgclf.data.images.decode_cost counts it for each image's "
                                              "format, mode and size (default: what the costliest image under "
                                              "--max-pixels up to a 4:1 aspect ratio needs: about 470 MiB at 40 MP)")
    body_timeout_s: float = _f(30.0, "seconds a client may pause between body chunks before a 408")
    body_deadline_s: float = _f(120.0, "seconds a whole request body may take before a 408")
    max_connections: int = _f(256, "open connections at once (uvicorn's limit); when all are open, the one "
                                   "waiting longest for a request head is closed")
    max_connections_per_client: int = _f(64, "open connections from one address; more get 503 at once (0: no "
                                              "limit, e.g. behind a reverse proxy that limits clients itself)")
    header_timeout_s: float = _f(10.0, "seconds a connection may take to send a complete request head (from "
                                       "opening it, or from the previous response) before it is closed")
    body_budget_mb: float | None = _f(None, "request bodies held in memory at once across all requests, MiB; "
                                            "more get 503 busy with Retry-After (default: 8 x max-body-mb)")
    similar: bool | None = _f(None, "serve /v1/similar (thumbnails of training images) for a run directory "
                                    "(default: on, except on a non-loopback --host without an API key)")
    similar_per_minute: float = _f(60.0, "/v1/similar requests a minute from one client address (a token bucket; "
                                         "more get 429 with Retry-After; 0: no limit, e.g. behind a reverse proxy "
                                         "that limits clients itself, where every client shares its address)")
    similar_burst: int = _f(20, "/v1/similar requests one client address may send at once before the per-minute "
                                "rate applies")
    public_metrics: bool = _f(False, "serve /metrics without the API key when one is set")
    reject: str | None = _f(None, "override the model's rejection of unknown inputs: auto, off, or a threshold "
                                  "in (0, 1] on the unknown score")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def body_budget_bytes(self) -> int:
        return int((self.body_budget_mb or 8 * self.max_body_mb) * 2**20)
