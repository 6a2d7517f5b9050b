"""Files every layer writes and reads: atomic writes (a crash leaves the old
file or the new one, never half of one), JSON, CSV history, and safe PyTorch
loading (weights_only=True: tensors and plain data, never code).

No torch at module level: the .onnx serving path writes and reads JSON too.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from imgclf.errors import ConfigError, ImgclfError, MissingExtra, ModelFileError, WriteError

UMASK = os.umask(0)
os.umask(UMASK)


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
    name = errno.errorcode.get(e.errno or 0, "")
    cause, fix = _WRITE_CAUSES.get(name, (e.strerror or str(e), "check that the folder is writable and has space"))
    err = WriteError(f"cannot write {path}: {cause} ({name or type(e).__name__}); nothing half-written was left", fix)
    err.errno = e.errno
    return err


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash
    leaves either the old file or the new one, never half of one. A failed
    write (full disk, file-size limit) is a WriteError naming the file."""
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
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a run dir is meant to be shared
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
        if isinstance(e, ImgclfError):
            raise
        raise write_error(getattr(e, "filename", None) or path, e) from None


def _atomic_write_folder(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700; a static site is meant to be served
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
    import torch  # deferred: the .onnx serving path imports this module and never torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """A model record or checkpoint, loaded safely (weights_only=True: tensors
    and plain data, never code). Anything else is a ModelFileError naming the
    file; PyTorch's own advice to retry with weights_only=False is never shown."""
    try:
        import torch  # deferred: the .onnx serving path imports this module and never torch
    except ImportError:
        raise MissingExtra(f"{path} is a PyTorch file and PyTorch is not installed",
                           "pip install 'imgclf[train]', or use an exported .onnx (imgclf export RUN)") from None
    fix = "restore it from a backup, or train again"
    try:
        with warnings.catch_warnings():  # torch warns about a bare pickle's protocol before failing on it
            warnings.simplefilter("ignore")
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


