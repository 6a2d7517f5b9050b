"""The run directory: everything a later command needs, written atomically,
read through one object, `RunDir`, which owns every artifact name.

RUN/
  model.pt        best weights + architecture, classes, preprocessing, config,
                  temperature (fitted on val at the end of training), version
  last.pt         latest checkpoint for --resume (optimizer, schedule, early stopping)
  config.json     resolved TrainConfig
  splits.json     the exact train/val/test files (relative paths)
  history.csv     one row per epoch
  summary.json    strategy chosen, timings, calibration, skipped files
  eval_<split>.json         metrics;  predictions_<split>.csv: per-image probabilities
  report/         index.html and eval.json
  model.onnx, model.int8.onnx, model.ort, model.torchscript.pt, model.tflite, ...   exports (they record model.pt's hash)
  web/            `export --format web`: a static site that classifies in the browser
  similar.npz     training images' embeddings and thumbnails for `similar` and /v1/similar
                  (built on first use, rebuilt when model.pt changes); similar.usearch: its
                  HNSW graph, from 100,000 training images on

model.pt holds only tensors, numbers, strings, lists and dicts, so it loads
with torch.load(weights_only=True) and across imgclf versions: no pickled code.
This module imports no torch at module level: the .onnx path uses RunDir too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
RECORD_KEYS = ("arch", "classes", "num_classes", "preprocess", "state_dict")
_UMASK = os.umask(0)
os.umask(_UMASK)


_WRITE_CAUSES = {  # errno -> (cause, fix) for one line instead of a traceback
    "EFBIG": ("the file-size limit (ulimit -f) is too small for it", "raise the limit (ulimit -f unlimited)"),
    "ENOSPC": ("the disk is full", "free some space on that disk, or write somewhere else"),
    "EDQUOT": ("the disk quota is used up", "free some space, or write somewhere else"),
    "EACCES": ("permission denied", "write to a folder you may write to, or fix its permissions"),
    "EPERM": ("permission denied", "write to a folder you may write to, or fix its permissions"),
    "EROFS": ("the file system is read-only", "write somewhere writable"),
}


def write_error(path: str | Path, e: OSError):
    """An OSError from writing `path` as a WriteError: the file, the cause
    (EFBIG, ENOSPC, EACCES...) and the fix, in one line."""
    import errno

    from imgclf.errors import WriteError

    name = errno.errorcode.get(e.errno or 0, "")
    cause, fix = _WRITE_CAUSES.get(name, (e.strerror or str(e), "check that the folder is writable and has space"))
    err = WriteError(f"cannot write {path}: {cause} ({name or type(e).__name__}); nothing half-written was left", fix)
    err.errno = e.errno
    return err


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash
    leaves either the old file or the new one, never half of one. A failed
    write (full disk, file-size limit) is a WriteError naming the file."""
    from imgclf.errors import WriteError

    path = Path(path)
    try:  # (over `ulimit -f` the write fails with EFBIG: Python ignores SIGXFSZ)
        _atomic_write(path, data)
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e) from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run dir is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_replaceable_folder(path: Path, is_ours) -> None:
    """Refuse to overwrite anything but an empty folder or an earlier output
    (`is_ours(path)` says which), so a mistyped --out never deletes a user's folder."""
    from imgclf.errors import ConfigError

    if path.exists() and not (path.is_dir() and is_ours(path)) and (path.is_file() or any(path.iterdir())):
        raise ConfigError(f"--out {path} already exists and is not an earlier export of this kind",
                          "give a new or empty folder, or delete that one")


def atomic_write_folder(path: str | Path, files: dict[str, bytes], is_ours) -> None:
    """Write a folder of files (relative path -> bytes) beside `path`, then
    rename it into place. An existing folder is replaced only when
    `is_ours(path)`: an earlier output of the same kind, never a user's folder."""
    path = Path(path)
    check_replaceable_folder(path, is_ours)
    try:
        _atomic_write_folder(path, files)
    except OSError as e:
        from imgclf.errors import ImgclfError

        if isinstance(e, ImgclfError):
            raise
        raise write_error(getattr(e, "filename", None) or path, e) from None


def _atomic_write_folder(path: Path, files: dict[str, bytes]) -> None:
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a static site is meant to be served
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
        if old:
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def torch_save_atomic(obj, path: str | Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """A model record or checkpoint, loaded safely (weights_only=True: tensors
    and plain data, never code). Anything else is a ModelFileError naming the
    file; PyTorch's own advice to retry with weights_only=False is never shown."""
    from imgclf.errors import MissingExtra, ModelFileError

    try:
        import torch
    except ImportError:
        raise MissingExtra(f"{path} is a PyTorch file and PyTorch is not installed",
                           "pip install 'imgclf[train]', or use an exported .onnx (imgclf export RUN)") from None
    fix = "restore it from a backup, or train again"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = "weights_only" in str(e) or "Unsupported global" in str(e)
        what = "it holds Python objects or code, which imgclf never runs" if unsafe else \
            f"it is truncated or not a PyTorch file ({type(e).__name__})"
        raise ModelFileError(f"{path}: cannot be loaded: {what}", fix) from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if not isinstance(obj, dict) or missing:
        raise ModelFileError(f"{path}: not an imgclf file (missing {', '.join(missing) or 'everything'})", fix)
    return obj


def write_history(path: str | Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_history(path: str | Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLock:
    """One writer per run directory: `imgclf train` holds RUN/.imgclf.lock
    (an flock, which the kernel releases when the process ends, however it
    ends) for as long as it writes the run. A second run refuses, naming the
    holder (pid, host, start time); a lock file left by a run that died is
    taken over, with a note (`took_over`)."""

    NAME = ".imgclf.lock"

    def __init__(self, folder: str | Path, run_id: str = ""):
        self.folder, self.run_id, self.fd, self.took_over = Path(folder), run_id, None, ""

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        path = self.folder / self.NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_UMASK)
        except OSError as e:
            raise write_error(path, e) from None
        holder = _lock_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            from imgclf.errors import RunError

            raise RunError(f"{self.folder} is being written by another imgclf run ({_describe_holder(holder)})",
                           "wait for it to finish, or give this run another --out") from None
        if holder:
            self.took_over = (f"took over the lock of an earlier run that stopped without releasing it "
                              f"({_describe_holder(holder)})")
        import socket
        import time

        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "run_id": self.run_id}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly
            os.close(self.fd)  # releases the flock
            self.fd = None


def _lock_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe_holder(h: dict) -> str:
    return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}" if h
            else "its pid, host and start time are not recorded yet")


class RunDir:
    """A run directory: its artifact names and the questions every command asks.

    Accepts RUN or RUN/model.pt (or any .pt inside RUN)."""

    MODEL, LAST, CONFIG, SPLITS = "model.pt", "last.pt", "config.json", "splits.json"
    HISTORY, SUMMARY, REPORT, SEARCH = "history.csv", "summary.json", "report", "search.csv"
    SIMILAR, SIMILAR_GRAPH = "similar.npz", "similar.usearch"
    EXPORTS = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "ort": "model.ort", "ort-int8": "model.int8.ort",
               "torchscript": "model.torchscript.pt", "tflite": "model.tflite", "tflite-int8": "model.int8.tflite",
               "web": "web"}
    ONNX_SUFFIXES = (".onnx", ".ort")  # files onnxruntime runs: no torch needed
    TFLITE_SUFFIXES = (".tflite",)  # files the LiteRT interpreter runs (imgclf[litert]): no torch either

    def __init__(self, path: str | Path):
        p = Path(path)
        self.path = p.parent if p.suffix == ".pt" else p
        self.model_file = p if p.suffix == ".pt" else p / self.MODEL

    last_file = property(lambda self: self.path / self.LAST)
    config_file = property(lambda self: self.path / self.CONFIG)
    splits_file = property(lambda self: self.path / self.SPLITS)
    history_file = property(lambda self: self.path / self.HISTORY)
    summary_file = property(lambda self: self.path / self.SUMMARY)
    search_file = property(lambda self: self.path / self.SEARCH)
    report_dir = property(lambda self: self.path / self.REPORT)
    similar_file = property(lambda self: self.path / self.SIMILAR)
    similar_graph_file = property(lambda self: self.path / self.SIMILAR_GRAPH)
    report_page = property(lambda self: self.path / self.REPORT / "index.html")
    report_json = property(lambda self: self.path / self.REPORT / "eval.json")

    def eval_file(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def predictions_file(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def export_file(self, fmt: str, int8: bool = False) -> Path:
        return self.path / self.EXPORTS[fmt + ("-int8" if int8 else "")]

    def __str__(self) -> str:
        return str(self.path)

    # ---- questions
    def require_model(self) -> Path:
        """model.pt, or an error that says how to make one."""
        if not self.model_file.exists():
            from imgclf.errors import RunError

            fix = f"train one with `imgclf train DATA --out {self.path}`"
            if self.last_file.exists():
                fix += f", or resume the interrupted run with `imgclf train --resume --out {self.path}`"
            raise RunError(f"{self.model_file}: no trained model here", fix)
        return self.model_file

    def record(self) -> dict:
        """The model record in model.pt (loaded safely: tensors and plain data only),
        checked to belong to the same run as config.json and splits.json."""
        rec = torch_load(self.require_model(), RECORD_KEYS)
        self.check_one_run(rec.get("run_id"))
        return rec

    def check_one_run(self, model_id: str | None) -> None:
        """model.pt, config.json and splits.json carry the id of the run that
        wrote them; files of two runs in one folder (two trainings writing one
        --out, a copy mixed by hand) are refused rather than scored wrongly.
        Runs from before ids existed have none and pass."""
        from imgclf.errors import RunError

        ids = {self.MODEL: model_id}
        for f in (self.config_file, self.splits_file):
            try:
                ids[f.name] = read_json(f).get("run_id") if f.exists() else None
            except (OSError, ValueError, AttributeError):
                ids[f.name] = None
        known = {k: v for k, v in ids.items() if v}
        if len(set(known.values())) > 1:
            raise RunError(f"{self.path} mixes files of different runs (" + ", ".join(
                f"{k}: run {v}" for k, v in known.items()) + "), as when two trainings wrote one --out",
                f"train again into a new folder (imgclf train DATA --out NEW), or delete {self.path}")

    def model_sha256(self) -> str:
        import hashlib

        h = hashlib.sha256()
        with open(self.require_model(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def splits(self, root: str | None = None):
        """The exact files of each split (Splits), optionally under another data root."""
        from imgclf.data.datasets import Splits

        if not self.splits_file.exists():
            from imgclf.errors import RunError

            raise RunError(f"{self.splits_file} is missing", "use the run directory that `imgclf train` wrote")
        return Splits.from_dict(read_json(self.splits_file), root=root)

    def held_out_split(self) -> str:
        """Where headline metrics come from: test if the data has one, else val."""
        if self.splits_file.exists():
            return self.splits().held_out
        found = sorted(self.path.glob("eval_*.json"))
        if found:
            return found[0].stem.removeprefix("eval_")
        from imgclf.errors import RunError

        raise RunError(f"{self.path}: no splits.json and no eval_*.json",
                       "is this a run directory (imgclf train DATA --out RUN)?")

    def selection_split(self) -> str:
        """The split choices (epoch, temperature) are made on: val, else test."""
        d = read_json(self.splits_file)
        return "val" if d.get("val") else "test"

    def metrics(self, split: str | None = None) -> dict:
        f = self.eval_file(split or self.held_out_split())
        return read_json(f) if f.exists() else {}

    def headline_metrics(self) -> dict:
        """The held-out accuracy a deployment shows (/v1/model, export metadata):
        the held-out split of the run's own data, never another folder's."""
        try:
            split = self.held_out_split()
        except FileNotFoundError:  # not a run directory (RunError)
            return {}
        m = self.metrics(split)
        if not m or (self.splits_file.exists() and m.get("data") != self.splits().root):
            return {}
        return {"split": split, "n": m.get("n"), "accuracy": m.get("accuracy"),
                "balanced_accuracy": m.get("balanced_accuracy")}

    def history(self) -> list[dict]:
        return read_history(self.history_file)

    def summary(self) -> dict:
        return read_json(self.summary_file) if self.summary_file.exists() else {}


def make_model_record(model, model_name: str, classes: list[str], preprocess, config: dict,
                      temperature: float = 1.0, extra: dict | None = None) -> dict:
    from imgclf import __version__

    return {
        "format_version": FORMAT_VERSION,
        "imgclf_version": __version__,
        "arch": model_name,
        "num_classes": len(classes),
        "num_features": model.num_features,
        "head_hidden": list(config.get("head_hidden") or []),
        "dropout": config.get("dropout", 0.2),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "temperature": float(temperature),
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }


def model_from_record(rec: dict):
    """Rebuild the network from a model record (no pretrained download: the
    record's own weights replace them)."""
    from imgclf.errors import ModelFileError
    from imgclf.models.registry import build_model, record_arch

    if rec.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"model file format {rec['format_version']} is newer than this imgclf understands",
                             "upgrade imgclf (pip install -U imgclf)")
    m = build_model(record_arch(rec["arch"], rec["state_dict"]), rec["num_classes"], pretrained=False,
                    head_hidden=tuple(rec.get("head_hidden") or ()), dropout=rec.get("dropout", 0.2))
    try:
        m.load_state_dict(rec["state_dict"])
    except RuntimeError as e:
        raise ModelFileError(f"the model file's weights do not fit a {rec['arch']} ({str(e).splitlines()[0]})",
                             "the file is damaged or was edited; train again") from None
    return m.eval()
