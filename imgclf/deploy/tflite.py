"""`imgclf export RUN --format tflite`: a LiteRT (TFLite) model for Android.

The converter is litert-torch (formerly ai-edge-torch), straight from the same
PyTorch wrapper the ONNX export is traced from (uint8 NHWC in, normalisation
and temperature inside, calibrated probabilities out). Measured against
onnx2tf (ONNX -> TensorFlow -> TFLite) on EfficientNet-Lite0, 2 shared cores
(docs/benchmarks.md, "Choosing the TFLite converter"):

- litert-torch installs beside imgclf's torch, numpy, onnx and onnxruntime
  without changing them; onnx2tf pins numpy 1.26.4, onnx 1.19.1,
  onnxruntime 1.23.0, protobuf 4.25.5 and tensorflow 2.19, so it cannot share
  an environment with imgclf at all;
- litert-torch's file uses builtin ops only and matches PyTorch to 2.5e-6;
  onnx2tf's used TensorFlow "Flex" ops (FlexConv2D), which the plain LiteRT
  interpreter refuses and Android needs an extra select-ops runtime for;
- litert-torch converted in 41 s, onnx2tf in 277 s.

INT8 is ai-edge-quantizer's dynamic-range recipe (int8 weights, per channel;
activations quantised on the fly), chosen by measurement over full-integer
static INT8 (see `quantize_tflite`). Heavy imports stay inside functions: the
`mobile` extra is optional.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from imgclf.errors import MissingExtra
from imgclf.inference.litert_predictor import INPUT, METADATA_NAME, OUTPUT, native_logs_hidden

_CONVERTED: dict[tuple, bytes] = {}  # (model.pt hash, size) -> fp32 .tflite: --int8 after fp32 converts once


def _need_mobile():
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # no progress bars in imgclf's output
    try:
        with native_logs_hidden():
            import ai_edge_quantizer  # noqa: F401
            import litert_torch
    except ImportError as e:
        raise MissingExtra(f"--format tflite needs the LiteRT converter ({e.name} is not installed)",
                           "pip install 'imgclf[mobile]'") from None
    return litert_torch


def to_tflite(wrapped, size: int, key: tuple, outputs: tuple[str, ...] = (OUTPUT,)) -> bytes:
    """The probs module -> a .tflite with one signature, `images` (uint8, 1xSxSx3)
    -> `probs` (and `unknown`, `rejected`, `selected` as the ONNX graph has them). `key` names the model (its model.pt hash): a process that
    exports the same model twice (fp32, then --int8) converts it once."""
    if key in _CONVERTED:
        return _CONVERTED[key]
    import torch

    litert_torch = _need_mobile()

    class Named(torch.nn.Module):  # signature names as in the ONNX graph, not args_0 / output_0
        def __init__(self):
            super().__init__()
            self.inner = wrapped

        def forward(self, images):
            out = self.inner(images)
            return dict(zip(outputs, out if isinstance(out, tuple) else (out,)))

    sample = {INPUT: torch.zeros(1, size, size, 3, dtype=torch.uint8)}
    with native_logs_hidden():
        _CONVERTED[key] = bytes(litert_torch.convert(Named().eval(), (), sample_kwargs=sample).model_content())
    return _CONVERTED[key]


def quantize_tflite(fp32: bytes) -> bytes:
    """Dynamic-range INT8 (ai-edge-quantizer `dynamic_wi8_afp32`): int8 per-channel
    weights, float activations quantised per call. On EfficientNet-Lite0 /
    cats_dogs_tiny (100 val images) it kept accuracy and fp32's top-1 on every
    image, and needs no calibration images. Full-integer static INT8
    (`static_wi8_ai8`, calibrated on 100 train images) also kept accuracy but
    quantises the softmax, returning int8 scores instead of probabilities,
    and was no faster on this CPU (docs/benchmarks.md)."""
    _need_mobile()
    from ai_edge_quantizer import quantizer, recipe

    with native_logs_hidden():
        qt = quantizer.Quantizer(bytearray(fp32), recipe.dynamic_wi8_afp32())
        return bytes(qt.quantize(enable_progress_report=False).quantized_model)


def with_metadata(model: bytes, meta: dict[str, str]) -> bytes:
    """The model with `meta` (the ONNX export's metadata) as the flatbuffer's
    `imgclf` metadata entry, then TFLite's associated-files zip appended:
    labels.txt (one class a line) and imgclf.json."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    m = flatbuffer_utils.read_model_from_bytearray(bytearray(model))  # buffers stored by offset made inline
    blob = json.dumps(meta).encode()
    buf = schema.BufferT()
    buf.data = np.frombuffer(blob, np.uint8)
    m.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(m.buffers) - 1
    m.metadata = [e for e in (m.metadata or []) if e.name != METADATA_NAME.encode()] + [entry]
    out = io.BytesIO(bytes(flatbuffer_utils.convert_object_to_bytearray(m)))
    out.seek(0, io.SEEK_END)
    # "a" on a non-zip appends an archive with offsets from the file start; STORED
    # (uncompressed), as Android's MetadataExtractor.getAssociatedFile reads raw entries.
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr("labels.txt", "\n".join(json.loads(meta["classes"])) + "\n")
        z.writestr("imgclf.json", blob)
    return out.getvalue()
