"""What every task's export driver shares (deploy/export.py for classifiers,
deploy/export_detect.py for detectors): which check images to take, the
metadata written into an ONNX file, static INT8 with onnxruntime and the
accuracy gate's words, and the conversion to ONNX Runtime's own format."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.inference.onnx_predictor import INPUT
from imgclf.runs import RunDir


def every_kth(items: list, limit: int | None) -> list:
    """Every k-th item, so a subset still covers every class (splits are sorted by class)."""
    return items[::max(1, len(items) // limit)][:limit] if limit else items


def with_metadata(m, meta: dict[str, str]) -> bytes:
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    what = "imgclf object detector: " if meta.get("task") == "detect" else "imgclf image classifier: "
    m.doc_string = what + meta["input"] + " -> " + meta["output"]
    return m.SerializeToString()


@dataclass(frozen=True)
class Int8Recipe:
    """How `quantize` makes a static INT8 model; the default is the one chosen
    by measurement (bench/bench_int8.py, docs/benchmarks.md).

    ops: the op types quantized. `Clip` (ReLU6) must be among them: only then
    does the quantizer give each convolution's output the range after the
    clip ([0, 6]) instead of the wide range before it, and drop the
    dequantize -> Clip -> quantize between convolutions; without it the
    default model lost accuracy and most of the speed. `Add` and
    `GlobalAveragePool` keep the residual sums and the pooling in int8 too
    (fewer conversions; as accurate). Per-channel weights: per-tensor ones
    lose accuracy on the depthwise convolutions.
    float_layers: node-name parts kept in float ("conv_stem", "conv_head",
    "/head/", "conv_dw"). calibration: minmax, entropy or percentile.
    """

    format: str = "qoperator"  # or "qdq"
    ops: tuple[str, ...] = ("Conv", "Clip", "Add", "GlobalAveragePool", "Gemm", "MatMul")
    per_channel: bool = True
    symmetric_activations: bool = False
    calibration: str = "minmax"
    percentile: float = 99.999
    float_layers: tuple[str, ...] = ()
    preprocess: bool = True


INT8_RECIPE = Int8Recipe()


def quantize(fp32: bytes, x_cal: np.ndarray, meta: dict[str, str], recipe: Int8Recipe = INT8_RECIPE) -> bytes:
    """Static INT8 with onnxruntime, calibrated on `x_cal`, made as `recipe` says."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Batches of one size: the histogram calibrators (entropy, percentile) stack them.
    b = max(d for d in range(1, 9) if len(x_cal) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(x_cal), b))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {INPUT: x_cal[i:i + b]}

    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        if recipe.preprocess:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        else:
            pre = src
        # The unknown scorer stays float: its scale is a rank among validation distances.
        keep = ("/scorer/",) + recipe.float_layers
        skip = [n.name for n in onnx.load(str(pre)).graph.node if any(k in n.name for k in keep)]
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[recipe.calibration]
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer warns per tensor about bias scales
        try:
            quantize_static(str(pre), str(dst), Reader(),
                            quant_format=QuantFormat.QDQ if recipe.format == "qdq" else QuantFormat.QOperator,
                            per_channel=recipe.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(recipe.ops),
                            nodes_to_exclude=skip, calibrate_method=method,
                            extra_options={"ActivationSymmetric": recipe.symmetric_activations,
                                           "CalibPercentile": recipe.percentile})
        finally:
            root.setLevel(level)
        return with_metadata(onnx.load(str(dst)), meta)


def int8_verdict(fp32_acc: float, int8_acc: float, max_drop: float, force: bool, agreement: float | None = None,
                 min_agreement: float = 0.0) -> str | None:
    """None if the INT8 model may be written; otherwise why not (and how to override).
    Accuracy alone can hide answers that change both ways, so the share of
    images whose top-1 answer stays fp32's (`agreement`, single-label) is
    gated too."""
    drop = (fp32_acc - int8_acc) * 100
    low = agreement is not None and agreement < min_agreement - 1e-9
    if (drop <= max_drop + 1e-9 and not low) or force:
        return None
    same = "" if agreement is None else f"; top-1 as fp32 on {agreement:.1%}"
    if drop > max_drop + 1e-9:
        why = (f"INT8 accuracy drops by {drop:.1f} points ({fp32_acc:.1%} -> {int8_acc:.1%} on validation{same}), "
               f"over the limit of {max_drop:g}")
    else:
        why = (f"INT8 changes the top-1 answer of {1 - agreement:.1%} of validation images (top-1 as fp32 on "
               f"{agreement:.1%}, under the limit of {min_agreement:.1%}; accuracy {fp32_acc:.1%} -> {int8_acc:.1%})")
    return (f"{why}; the file was not written. Use the fp32 export, calibrate on more images (--calib-images), "
            f"or write it anyway with --force (or raise --max-drop / lower --min-agreement)")


def to_ort(onnx_bytes: bytes) -> bytes:
    """ONNX Runtime's own format (.ort) of an ONNX graph: basic optimisations, saved by onnxruntime itself."""
    import onnxruntime as ort  # deferred: a converter, only for --format ort

    with tempfile.TemporaryDirectory(prefix="imgclf-ort-") as tmp:
        path = Path(tmp) / "model.ort"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(path)
        so.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        return path.read_bytes()


def held_out(run: RunDir, keys: dict[str, str]) -> dict:
    """The figures a deployment shows, from the run's test (else val) eval
    file: {"split", ours: theirs for each of keys}; {} when it has none."""
    for split in ("test", "val"):
        f = run.eval_file(split)
        if f.exists():
            m = json.loads(f.read_text())
            return {"split": split, **{ours: m.get(theirs) for ours, theirs in keys.items()}}
    return {}
