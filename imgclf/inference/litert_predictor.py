"""An exported `.tflite` classifier as a Predictor, on the LiteRT interpreter
(`ai-edge-litert`, `pip install 'imgclf[litert]'`): the phone's model, run on
the desktop, with no torch and no onnxruntime.

`imgclf export RUN --format tflite` writes the same graph as the ONNX export
(uint8 RGB (1, S, S, 3) in, calibrated probabilities out, normalisation and
temperature inside) and stores the same metadata in two places:

- the flatbuffer's `metadata` table, entry `imgclf`: the JSON object the ONNX
  export carries as metadata_props (labels, preprocessing, temperature,
  model_sha256, ...), read by `read_metadata` below;
- TFLite's associated-files zip appended to the file (the convention of the
  TFLite Support library's MetadataExtractor): `labels.txt` and `imgclf.json`,
  so an Android app reads the labels without parsing flatbuffers.

This module must never import torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np

from imgclf.errors import MissingExtra, ModelFileError, RunError
from imgclf.inference.onnx_predictor import FORMAT, _maybe_json, warn_if_stale
from imgclf.inference.predictor import Predictor

METADATA_NAME = "imgclf"  # the flatbuffer metadata entry holding the JSON
INPUT, OUTPUT = "images", "probs"  # the signature's tensor names, as in the ONNX graph
SIGNATURE = "serving_default"


def read_metadata(model: bytes, source: str = "<bytes>") -> dict:
    """The imgclf metadata of a .tflite, decoded like the ONNX export's
    (values that are JSON become objects). Raises ModelFileError when the file
    is not a TFLite model or not an imgclf export."""
    if model[4:8] != b"TFL3":  # the flatbuffer's file identifier
        raise ModelFileError(f"{source}: not a TFLite model (no TFL3 identifier)",
                             "export one with `imgclf export RUN --format tflite`")
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise MissingExtra("reading a .tflite needs ai-edge-litert, which is not installed",
                           "pip install 'imgclf[litert]'") from None
    try:
        m = schema.Model.GetRootAs(model, 0)
        entries = {m.Metadata(i).Name(): m.Metadata(i).Buffer() for i in range(m.MetadataLength())}
        raw = entries.get(METADATA_NAME.encode())
        meta = json.loads(_buffer(model, m.Buffers(raw))) if raw is not None else {}
    except Exception:  # flatbuffers raises bare struct/index errors on a foreign file
        raise ModelFileError(f"{source}: not a loadable TFLite model (it has the TFL3 identifier, but its "
                             f"structure is damaged or truncated)",
                             "export it again with `imgclf export RUN --format tflite`") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{source}: not an imgclf export (no '{METADATA_NAME}' metadata with format {FORMAT})",
                             "export the run with `imgclf export RUN --format tflite`")
    return {k: _maybe_json(v) for k, v in meta.items()}


def _buffer(model: bytes, buf) -> bytes:
    # Inline, or (models written by some tools) stored after the flatbuffer at an offset.
    return model[buf.Offset():buf.Offset() + buf.Size()] if buf.Offset() > 1 else buf.DataAsNumpy().tobytes()


def associated_files(model: bytes) -> dict[str, bytes]:
    """The files zipped onto the end of a .tflite (labels.txt, imgclf.json)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as z:
            return {n: z.read(n) for n in z.namelist()}
    except zipfile.BadZipFile:
        return {}


@contextlib.contextmanager
def native_logs_hidden():
    """LiteRT and its converters write to file descriptor 2 from C++ ("INFO:
    Created TensorFlow Lite XNNPACK delegate", absl lines, progress bars) and
    log per op from Python: hidden unless IMGCLF_DEBUG=1, replayed if the step fails."""
    if os.environ.get("IMGCLF_DEBUG"):
        yield
        return
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(io.StringIO()) as py_log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.__stderr__.write((log.read().decode(errors="replace") + py_log.getvalue())[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            logging.getLogger().setLevel(level)


def signature_runner(model: bytes, threads: int | None = None):
    """The model's `serving_default` signature on a LiteRT interpreter (XNNPACK
    on CPU), ready to call. The one place imgclf makes interpreters."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise MissingExtra("running a .tflite needs the LiteRT interpreter (ai-edge-litert), which is not installed",
                           "pip install 'imgclf[litert]'") from None
    with native_logs_hidden():  # XNNPACK announces itself when tensors are first allocated
        runner = Interpreter(model_content=model, num_threads=threads or os.cpu_count() or 1).get_signature_runner(
            SIGNATURE)
        inp = runner.get_input_details()[INPUT]
        runner(**{INPUT: np.zeros(inp["shape"], inp["dtype"])})
    return runner


class LiteRTPredictor(Predictor):
    def __init__(self, path: str | Path | bytes, threads: int | None = None):
        """path: a .tflite file, or its bytes (the export checks a model before writing it)."""
        self.source = "<bytes>" if isinstance(path, bytes) else str(path)
        if not isinstance(path, bytes) and not Path(path).is_file():
            raise RunError(f"{path}: no such model file", "write one with `imgclf export RUN --format tflite`")
        data = path if isinstance(path, bytes) else Path(path).read_bytes()
        meta = read_metadata(data, self.source)  # first: a foreign file gets imgclf's message, not LiteRT's
        self.runner = signature_runner(data, threads)
        self.read_export_metadata(meta, "unknown" in self.runner.get_output_details())
        # The interpreter is not thread-safe: one call at a time (it uses every core inside one).
        self._lock = threading.Lock()
        if not isinstance(path, bytes):
            warn_if_stale(self.metadata, path)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("arch", "?"))

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # The graph has batch size 1, as phone apps call it; a batch is a loop.
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        with self._lock:
            outs = [self.runner(**{INPUT: batch[i:i + 1]}) for i in range(len(batch))]
        p = np.concatenate([o[OUTPUT] for o in outs])
        return p, (np.concatenate([np.reshape(o["unknown"], (-1,)) for o in outs]) if self.has_unknown else None)
