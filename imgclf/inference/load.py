"""Open any model file by what it holds, not by its name: a run directory or
a PyTorch model.pt (TorchPredictor), an ONNX graph or an ORT-format file
(OnnxPredictor, onnxruntime alone) or a TFLite flatbuffer (LiteRTPredictor).
The one place imgclf decides a model file's format.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.errors import ModelFileError, RunError
from imgclf.inference.litert_predictor import LiteRTPredictor
from imgclf.inference.onnx_predictor import OnnxPredictor
from imgclf.inference.predictor import Predictor

FORMATS = ("run", "pytorch", "onnx", "ort", "tflite")
TORCH_FREE = ("onnx", "ort", "tflite")  # served without importing torch
# What a file's name promised, for the message when its content is not that.
_EXPORT_NAMES = {".onnx": ("not a loadable ONNX model", "onnx"), ".ort": ("not a loadable ORT model", "ort"),
                 ".tflite": ("not a TFLite model", "tflite")}


def model_format(path: str | Path) -> str:
    """"run" for a folder, else the file's format from its first bytes:
    PyTorch files are zip archives; ORT and TFLite files are flatbuffers whose
    4-byte identifier sits at offset 4; an ONNX ModelProto starts with field 1
    (ir_version, a varint: byte 0x08). The name only words the messages."""
    p = Path(path)
    if p.is_dir():
        return "run"
    named = _EXPORT_NAMES.get(p.suffix.lower())
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        how = f"`imgclf export RUN --format {named[1]}`" if named else "`imgclf export RUN`"
        raise RunError(f"{p}: no such model file or run directory",
                       f"give a run directory (imgclf train), its model.pt, or a file written by {how}") from None
    except OSError as e:
        raise ModelFileError(f"{p}: cannot be read ({e.strerror})", "check the file's permissions") from None
    if head.startswith(b"PK\x03\x04"):
        return "pytorch"
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[4:8] == b"ORTM":
        return "ort"
    if head[:1] == b"\x08":
        return "onnx"
    if named:
        raise ModelFileError(f"{p}: {named[0]} (its content is not one)",
                             f"export it again with `imgclf export RUN --format {named[1]}`")
    raise ModelFileError(f"{p}: not a model file imgclf knows (not a PyTorch, ONNX, ORT or TFLite file)",
                         "give a run directory, its model.pt, or a file from `imgclf export`")


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | Path | None = None,
         threads: int | None = None) -> Predictor:
    """A trained classifier from a run directory or its model.pt (PyTorch), an
    exported .onnx / .ort (onnxruntime alone, no torch) or .tflite (the LiteRT
    interpreter, no torch); same `.predict()`."""
    fmt = model_format(path)
    if fmt in ("onnx", "ort"):
        return OnnxPredictor(path, threads=threads)
    if fmt == "tflite":
        return LiteRTPredictor(path, threads=threads)
    from imgclf.inference.torch_predictor import TorchPredictor  # deferred: torch; exports are served without it

    return TorchPredictor.from_run(path, device=device, engine=engine, cache_dir=cache_dir)
