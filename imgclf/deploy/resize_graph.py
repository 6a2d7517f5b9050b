"""The resize policy as ONNX nodes: an exported model that takes images of any size.

    uint8 (N, H, W, 3), any H and W  --Resize(antialias)-->  uint8 (N, S, S, 3)  --the checked model-->  probs

Pillow's resize (what data/preprocess.py runs) is a separable convolution
whose filter widens with the downscale factor; ONNX's Resize with
`antialias=1` (opset 18) is defined after it. So the graph below reproduces
`resize_image` on the same decoded pixels, for crop, squash and pad, within a
level or two of onnxruntime's rounding (tests/test_web_export.py checks it;
every export checks it again), in every onnxruntime, onnxruntime-web and
onnxruntime-mobile included: an app feeds the decoded photo and resizes
nothing itself. What it cannot see is how the pixels were decoded: Python
decodes big JPEGs at 1/2-1/8 scale (libjpeg's draft mode) and box-reduces
very large photos first (reducing_gap); an app decodes at full size.
docs/architecture.md has the measured cost of that difference.

Only the web export and `export --any-size` use it: `imgclf predict` and
`serve` feed the fixed-size model, resized by Pillow.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18  # Resize's antialias attribute
INPUT, RESIZED = "images", "resized"
MAX_ASPECT = 8  # preprocess.resize_image: beyond 8:1, only the centre is resized


class _Nodes:
    """A list of ONNX nodes with short helpers for the size arithmetic."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype) -> str:
        self.n += 1
        name = f"rs_c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.n += 1
        out = f"rs_{op_type.lower()}{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def i64(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.INT64)

    def f64(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.DOUBLE)

    def rounded(self, x: str) -> str:
        """Python's round() (halves to even), as ONNX's Round does, to int64."""
        return self.i64(self.op("Round", x))


def _centre(g: _Nodes, image: str, h: str, w: str, th: str, tw: str) -> str:
    """The centred th x tw window of `image` (NHWC); offsets (h - th) // 2."""
    two = g.const([2], np.int64)
    top, left = g.op("Div", g.op("Sub", h, th), two), g.op("Div", g.op("Sub", w, tw), two)
    starts = g.op("Concat", top, left, axis=0)
    ends = g.op("Concat", g.op("Add", top, th), g.op("Add", left, tw), axis=0)
    return g.op("Slice", image, starts, ends, g.const([1, 2], np.int64))


def _resize(g: _Nodes, image: str, nh: str, nw: str, antialias: bool) -> str:
    sizes = g.op("Concat", nh, nw, axis=0)
    # exclude_outside: weights over the pixels inside the image only, as
    # Pillow normalises them (without it, edge pixels differ by up to 5 levels).
    return g.op("Resize", image, "", "", sizes, mode="linear", antialias=int(antialias), axes=[1, 2],
                exclude_outside=int(antialias), coordinate_transformation_mode="half_pixel")


def _crop(g: _Nodes, x: str, h: str, w: str, pp, antialias: bool) -> str:
    short, s = pp.draft_size, g.const([pp.size], np.int64)
    # An extreme strip: only its centre (at most 8:1) can reach the crop; a
    # bounded intermediate, as resize_image's box path keeps it.
    limit = g.const([MAX_ASPECT], np.int64)
    hc, wc = g.op("Min", h, g.op("Mul", w, limit)), g.op("Min", w, g.op("Mul", h, limit))
    x = _centre(g, x, h, w, hc, wc)
    r = g.op("Div", g.const([float(short)], np.float64), g.f64(g.op("Min", hc, wc)))
    lo = g.const([short], np.int64)
    nh = g.op("Max", lo, g.rounded(g.op("Mul", g.f64(hc), r)))
    nw = g.op("Max", lo, g.rounded(g.op("Mul", g.f64(wc), r)))
    return _centre(g, _resize(g, x, nh, nw, antialias), nh, nw, s, s)


def _pad(g: _Nodes, x: str, h: str, w: str, pp, antialias: bool) -> str:
    s = pp.size
    r = g.op("Div", g.const([float(s)], np.float64), g.f64(g.op("Max", h, w)))
    one = g.const([1], np.int64)
    nh, nw = (g.op("Max", one, g.rounded(g.op("Mul", g.f64(v), r))) for v in (h, w))
    small = _resize(g, x, nh, nw, antialias)
    sz, two = g.const([s], np.int64), g.const([2], np.int64)
    top, left = g.op("Div", g.op("Sub", sz, nh), two), g.op("Div", g.op("Sub", sz, nw), two)
    zero = g.const([0], np.int64)
    pads = g.op("Concat", zero, top, left, zero, zero, g.op("Sub", g.op("Sub", sz, nh), top),
                g.op("Sub", g.op("Sub", sz, nw), left), zero, axis=0)
    # Pad takes one fill value; the letterbox colour is per channel: pad
    # (image - colour) with zeros, then add the colour back.
    colour = g.const(np.array(pp.pad_color, np.float32).reshape(1, 1, 1, 3), np.float32)
    shifted = g.op("Sub", g.op("Cast", small, to=TensorProto.FLOAT), colour)
    padded = g.op("Add", g.op("Pad", shifted, pads, mode="constant"), colour)
    return g.op("Cast", padded, to=TensorProto.UINT8)


def resize_model(pp, antialias: bool = True) -> onnx.ModelProto:
    """ONNX model: uint8 `images` (N, H, W, 3) of any size -> uint8 `resized`
    (N, S, S, 3), by pp.resize (crop, squash or pad) with pp.interpolation
    (bilinear; bicubic is Resize's "cubic" with Pillow's a = -0.5).
    antialias=False gives a plain bilinear resize (no widened filter), the
    kind many image APIs do, for comparison."""
    g = _Nodes()
    shape = g.op("Shape", INPUT)
    h = g.op("Slice", shape, g.const([1], np.int64), g.const([2], np.int64))
    w = g.op("Slice", shape, g.const([2], np.int64), g.const([3], np.int64))
    if pp.resize == "crop":
        out = _crop(g, INPUT, h, w, pp, antialias)
    elif pp.resize == "pad":
        out = _pad(g, INPUT, h, w, pp, antialias)
    else:
        s = g.const([pp.size], np.int64)
        out = _resize(g, INPUT, s, s, antialias)
    if pp.interpolation == "bicubic":
        for n in g.nodes:
            if n.op_type == "Resize":
                n.attribute.remove(next(a for a in n.attribute if a.name == "mode"))
                n.attribute.extend([helper.make_attribute("mode", "cubic"),
                                    helper.make_attribute("cubic_coeff_a", -0.5)])
    elif pp.interpolation != "bilinear":
        raise ValueError(f"interpolation {pp.interpolation!r} has no ONNX Resize equivalent here")
    g.nodes.append(helper.make_node("Identity", [out], [RESIZED]))
    graph = helper.make_graph(
        g.nodes, "imgclf_resize",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info(RESIZED, TensorProto.UINT8, ["n", pp.size, pp.size, 3])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def longer_side_model(size: int, antialias: bool = True) -> onnx.ModelProto:
    """ONNX model: uint8 `images` (N, H, W, 3) of any size -> uint8 `resized`
    (N, h, w, 3) with the longer side at `size` and the aspect kept, bilinear:
    segmentation's resize (tasks/segment/predictor.py: base_size,
    prepare_image), as `_pad` sizes its letterbox before padding. An image
    already at that size passes unchanged."""
    g = _Nodes()
    shape = g.op("Shape", INPUT)
    h = g.op("Slice", shape, g.const([1], np.int64), g.const([2], np.int64))
    w = g.op("Slice", shape, g.const([2], np.int64), g.const([3], np.int64))
    r = g.op("Div", g.const([float(size)], np.float64), g.f64(g.op("Max", h, w)))
    one = g.const([1], np.int64)
    nh, nw = (g.op("Max", one, g.rounded(g.op("Mul", g.f64(v), r))) for v in (h, w))
    g.nodes.append(helper.make_node("Identity", [_resize(g, INPUT, nh, nw, antialias)], [RESIZED]))
    graph = helper.make_graph(
        g.nodes, "imgclf_resize_longer_side",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info(RESIZED, TensorProto.UINT8, ["n", "rh", "rw", 3])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_resize(model_bytes: bytes, pp, antialias: bool = True) -> onnx.ModelProto:
    """The fixed-size exported model (uint8 `images` (N, S, S, 3) in) behind
    resize_model: the same outputs and metadata, `images` of any size in."""
    from onnx import compose, version_converter

    model = onnx.load_from_string(model_bytes)
    meta = {p.key: p.value for p in model.metadata_props}
    if model.opset_import[0].version < OPSET:
        model = version_converter.convert_version(model, OPSET)
    model.ir_version = max(model.ir_version, 8)
    pre = resize_model(pp, antialias)
    merged = compose.merge_models(pre, compose.add_prefix(model, "m/"), io_map=[(RESIZED, "m/" + INPUT)])
    for o in merged.graph.output:  # the outputs keep their names (probs, unknown, ...)
        old = o.name
        o.name = old[2:]
        for n in merged.graph.node:
            n.output[:] = [o.name if x == old else x for x in n.output]
            n.input[:] = [o.name if x == old else x for x in n.input]
    del merged.metadata_props[:]
    for k, v in meta.items():
        p = merged.metadata_props.add()
        p.key, p.value = k, v
    merged.doc_string = model.doc_string
    return merged
