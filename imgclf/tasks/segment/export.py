"""A segmenter as one ONNX graph: the task's part of `imgclf export`
(imgclf/deploy/export_segment.py drives it: metadata, the checks, the atomic write).

    uint8 images (N, H, W, 3), any H and W (one size per call)
      --the resize (deploy/resize_graph.py: longer side S, aspect kept, bilinear; passed in)-->
    uint8 (N, h, w, 3) --the network (traced; h and w stay dynamic)--> logits (N, C, h, w)
      --Resize (bilinear, align_corners=False)--> (N, C, H, W) --ArgMax, Cast--> uint8 labels (N, H, W)

This is the path `TorchSegPredictor.label_maps` takes (the logits brought to
the image's own size before the argmax), so the label map comes out at the
resolution of the image fed in. An app that feeds a downscaled copy instead
(to bound memory on a big photo) brings the label map back to the photo with
nearest neighbour: class ids are never blended.

The network keeps TensorFlow's 'SAME' padding computed from the input's
shape (timm's Conv2dSame traces to shape arithmetic): the aspect of each
image sets h and w, so the pads cannot be fixed as a classifier export's are.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper
from torch import nn

from imgclf.tasks.segment.model import Segmenter

INPUT, OUTPUT = "images", "labels"
OPSET = 18  # the resize's Resize(antialias) needs 18
RESIZED, LOGITS = "resized", "logits"


class Network(nn.Module):
    """uint8 (N, h, w, 3) -> logits (N, C, h, w), as `TorchSegPredictor._logits`
    computes them (x / 255, the segmenter)."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2).float() / 255)


def network_onnx(model: Segmenter, example_size: tuple[int, int]) -> onnx.ModelProto:
    """The traced network with batch, height and width dynamic."""
    h, w = example_size
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(Network(model.eval()), torch.zeros(1, h, w, 3, dtype=torch.uint8), buf,
                          input_names=[INPUT], output_names=[LOGITS], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT: {0: "n", 1: "h", 2: "w"}, LOGITS: {0: "n", 2: "h", 3: "w"}})
    return onnx.load_from_string(buf.getvalue())


def _tail(num_classes: int) -> onnx.ModelProto:
    """(original images, logits at the resized size) -> uint8 labels at the original size."""
    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, np.int64), name)

    nodes = [
        helper.make_node("Shape", ["images"], ["t_shape"]),
        helper.make_node("Slice", ["t_shape", "t_1", "t_3"], ["t_hw"]),
        helper.make_node("Shape", [LOGITS], ["t_lshape"]),
        helper.make_node("Slice", ["t_lshape", "t_0", "t_2"], ["t_nc"]),
        helper.make_node("Concat", ["t_nc", "t_hw"], ["t_sizes"], axis=0),
        # torch's bilinear, align_corners=False: half-pixel centres, no antialias
        helper.make_node("Resize", [LOGITS, "", "", "t_sizes"], ["t_up"], mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel"),
        helper.make_node("ArgMax", ["t_up"], ["t_arg"], axis=1, keepdims=0),  # ties: the first class, as torch
        helper.make_node("Cast", ["t_arg"], [OUTPUT], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes, "imgclf_segment_tail",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", "h", "w", 3]),
         helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["n", num_classes, "rh", "rw"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.UINT8, ["n", "h", "w"])],
        [const("t_0", [0]), const("t_1", [1]), const("t_2", [2]), const("t_3", [3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def segmenter_onnx(model: Segmenter, image_size: int, resize: onnx.ModelProto) -> onnx.ModelProto:
    """The whole graph: `resize` (uint8 `images` any size -> uint8 `resized`,
    deploy/resize_graph.py: longer_side_model), the network, the tail; one
    uint8 `images` input, one uint8 `labels` output."""
    net = network_onnx(model, (image_size, image_size))
    net.ir_version = max(net.ir_version, 8)
    both = compose.merge_models(resize, compose.add_prefix(net, "net/"), io_map=[(RESIZED, "net/" + INPUT)])
    tail = compose.add_prefix(_tail(model.config["num_classes"]), "tail/")
    merged = compose.merge_models(both, tail, io_map=[("net/" + LOGITS, "tail/" + LOGITS)])
    # The tail's own `images` is the graph's input: point its readers there.
    for n in merged.graph.node:
        n.input[:] = [INPUT if x == "tail/images" else x for x in n.input]
    del merged.graph.input[1:]
    for o in merged.graph.output:
        o.name = OUTPUT
    for n in merged.graph.node:
        n.output[:] = [OUTPUT if x == "tail/" + OUTPUT else x for x in n.output]
    mark_shape_arithmetic(merged)
    # merge_models lists every domain it knows; the graph uses the default one only
    # (onnxruntime's quantizer refuses more than one ai.onnx entry).
    assert all(not n.domain or n.domain == "ai.onnx" for n in merged.graph.node)
    del merged.opset_import[:]
    merged.opset_import.append(helper.make_opsetid("", OPSET))
    onnx.checker.check_model(merged)
    return merged


SHAPE_PREFIX = "shape_arith/"  # names of nodes that compute sizes, not pixels (INT8 must leave them alone)


def mark_shape_arithmetic(model: onnx.ModelProto) -> int:
    """Prefix the names of nodes that compute on the input's shape alone
    (TF padding, the resize's sizes) with SHAPE_PREFIX, in place; returns how
    many. Some of them are float Adds and Clips: a static quantizer would
    otherwise calibrate them as activations at the calibration images' size
    and pad every other size wrongly."""
    g = model.graph
    const = {i.name for i in g.initializer} | {""}
    shape: set[str] = set()
    marked = 0
    for k, n in enumerate(g.node):  # in topological order
        ins = list(n.input)
        if n.op_type == "Shape" or (any(i in shape for i in ins) and all(i in shape or i in const for i in ins)):
            shape.update(n.output)
            n.name, marked = f"{SHAPE_PREFIX}{n.name or k}", marked + 1
        elif all(i in const for i in ins):  # Constant nodes and what folds from them
            const.update(n.output)
    return marked


def pixel_agreement(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[int, int]:
    """(pixels with the same class, pixels) over label maps of matching shapes."""
    same = sum(int((g == w).sum()) for g, w in zip(got, want))
    return same, sum(w.size for w in want)
