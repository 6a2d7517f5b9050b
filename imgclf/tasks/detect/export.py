"""A detector as one ONNX graph: the task's part of `imgclf export`
(imgclf/deploy/export.py drives it: metadata, the checks, the atomic write).

    uint8 images (N, H, W, 3), any H and W  --the letterbox (deploy/resize_graph.py, "pad")-->
    uint8 (N, S, S, 3) --the network (traced)--> class logits (N, A, C), box regression (N, A, 4)
    --this module's postprocess (ONNX nodes)--> boxes (N, D, 4) in the input image's pixels,
    scores (N, D), labels (N, D), selected (N, D)

The postprocess is torchvision's `RetinaNet.postprocess_detections` (what
`Detector.postprocess` runs) written as ONNX nodes so that it takes a batch:
per pyramid level the top 1000 (anchor, class) scores, their boxes decoded
from the anchors (constants for the fixed input size) and clipped to it; then
NonMaxSuppression per class (IoU 0.5, scores above 0.05) and the best D = 300
per image. torchvision's own loop over images, its boolean filtering and
`batched_nms` trace to a graph fixed to one batch size; ONNX's TopK,
GatherND(batch_dims=1) and NonMaxSuppression take every image at once.

Rows are best first; a row with score 0 is padding (every real detection
scores above 0.05). `selected` is score >= its class's threshold (chosen on
val at training time, also in the metadata): an app needs no logic of its
own; `imgclf predict`/`serve` apply the thresholds (or --conf) themselves.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from imgclf.errors import ExportError
from imgclf.models.same_pad import trace_to_onnx
from imgclf.tasks.detect.model import Detector

INPUT = "images"
OUTPUTS = ("boxes", "scores", "labels", "selected")
NET_OUTPUTS = ("cls_logits", "bbox_regression")
OPSET = 18  # the letterbox's Resize(antialias) needs 18; TopK, GatherND(batch_dims), NonMaxSuppression are older
TOPK_PER_LEVEL, IOU, CANDIDATE, PER_IMAGE = 1000, 0.5, 0.05, 300  # = the head's settings (checked in `settings`)


class Network(nn.Module):
    """uint8 (N, S, S, 3) -> the head's raw outputs, as `Detector.predict`
    computes them (x / 255, the trunk, FPN, head); no anchors, no postprocess."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).float() / 255
        feats = self.model.forward_features(x)
        fpn = self.model.det.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        head = self.model.det.head(list(fpn.values()))
        return head["cls_logits"], head["bbox_regression"]


def settings(model: Detector) -> dict:
    """The head's postprocess settings, refused unless they are the ones the
    graph is written for (the default RetinaNet head)."""
    det = model.det
    if model.head_name != "retinanet":
        raise ExportError(f"the ONNX export writes RetinaNet's postprocess; this run's head is {model.head_name!r}",
                          "train with the default head (retinanet) to export it")
    got = {"topk": det.topk_candidates, "iou": det.nms_thresh, "per_image": det.detections_per_img}
    want = {"topk": TOPK_PER_LEVEL, "iou": IOU, "per_image": PER_IMAGE}
    if got != want or tuple(det.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
        raise ExportError(f"the detector's postprocess settings {got} are not the exported graph's {want}",
                          "export a run trained by this imgclf version")
    return {"clip": float(det.box_coder.bbox_xform_clip)}


def anchors_of(model: Detector, size: int) -> tuple[np.ndarray, list[int]]:
    """The anchors (A, 4) of a size x size input, and their number per pyramid level."""
    with torch.no_grad():
        out = model.forward(torch.zeros(1, 3, size, size))
    return out["anchors"][0].numpy().astype(np.float32), list(out["per_level"])


class _G:
    """ONNX nodes with short helpers (names are prefixed "dp_")."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype) -> str:
        self.n += 1
        name = f"dp_c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        self.n += 1
        outs = [f"dp_{op_type.lower()}{self.n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def cols(self, x: str, start: int, end: int) -> str:
        """x[..., start:end]"""
        return self.op("Slice", x, self.const([start], np.int64), self.const([end], np.int64),
                       self.const([-1], np.int64))


def _level(g: _G, cls: str, reg: str, anchors: np.ndarray, a0: int, a1: int, num_classes: int, clip: float,
           size: int) -> tuple[str, str, str]:
    """One pyramid level: the top scores of (anchor, class) pairs, their decoded and clipped boxes, their labels."""
    start, end, axis = g.const([a0], np.int64), g.const([a1], np.int64), g.const([1], np.int64)
    logits = g.op("Slice", cls, start, end, axis)
    scores = g.op("Reshape", g.op("Sigmoid", logits), g.const([0, -1], np.int64))  # (N, A_l * C), as .flatten()
    k = min(TOPK_PER_LEVEL, (a1 - a0) * num_classes)
    top, idx = g.op("TopK", scores, g.const([k], np.int64), axis=1, largest=1, sorted=1, outputs=2)
    c = g.const(num_classes, np.int64)
    anchor, label = g.op("Div", idx, c), g.op("Mod", idx, c)
    deltas = g.op("GatherND", g.op("Slice", reg, start, end, axis), g.op("Unsqueeze", anchor, g.const([2], np.int64)),
                  batch_dims=1)  # (N, k, 4)
    # The anchors as BoxCoder.decode_single sees them: centre and size,
    # computed in float32 exactly as it does (width = x2 - x1, ctr = x1 + 0.5 * width).
    a = anchors[a0:a1]
    wh = (a[:, 2:] - a[:, :2]).astype(np.float32)
    ctr = (a[:, :2] + np.float32(0.5) * wh).astype(np.float32)
    ctr_wh = g.op("Gather", g.const(np.concatenate([ctr, wh], 1), np.float32), anchor, axis=0)  # (N, k, 4)
    ctr_a, wh_a = g.cols(ctr_wh, 0, 2), g.cols(ctr_wh, 2, 4)
    d_wh = g.op("Min", g.cols(deltas, 2, 4), g.const(clip, np.float32))
    pred_ctr = g.op("Add", g.op("Mul", g.cols(deltas, 0, 2), wh_a), ctr_a)
    half = g.op("Mul", g.const(0.5, np.float32), g.op("Mul", g.op("Exp", d_wh), wh_a))
    boxes = g.op("Concat", g.op("Sub", pred_ctr, half), g.op("Add", pred_ctr, half), axis=-1)
    boxes = g.op("Clip", boxes, g.const(0.0, np.float32), g.const(float(size), np.float32))  # clip_boxes_to_image
    return boxes, top, label


def _to_original(g: _G, boxes: str, size: int) -> str:
    """Boxes in letterboxed pixels -> the input image's (DetPredictor.to_original
    and data/preprocess.py's pad_geometry, as nodes): minus the padding, over
    the scale, clipped to the image."""
    shape = g.op("Shape", INPUT)
    h, w = (g.op("Cast", g.op("Slice", shape, g.const([i], np.int64), g.const([i + 1], np.int64)),
                 to=TensorProto.DOUBLE) for i in (1, 2))
    r = g.op("Div", g.const([float(size)], np.float64), g.op("Max", h, w))
    one, s = g.const([1.0], np.float64), g.const([float(size)], np.float64)
    nh, nw = (g.op("Max", one, g.op("Round", g.op("Mul", v, r))) for v in (h, w))
    two = g.const([2.0], np.float64)
    top, left = (g.op("Floor", g.op("Div", g.op("Sub", s, v), two)) for v in (nh, nw))
    offset = g.op("Concat", left, top, left, top, axis=0)
    scale = g.op("Concat", *[g.op("Div", n, d) for n, d in ((nw, w), (nh, h))] * 2, axis=0)
    limit = g.op("Concat", w, h, w, h, axis=0)
    b = g.op("Div", g.op("Sub", g.op("Cast", boxes, to=TensorProto.DOUBLE), offset), scale)
    b = g.op("Min", g.op("Max", b, g.const([0.0], np.float64)), limit)
    return g.op("Cast", b, to=TensorProto.FLOAT)


def postprocess_graph(anchors: np.ndarray, per_level: list[int], num_classes: int, size: int, clip: float,
                      thresholds) -> _G:
    """The nodes from the network's outputs (and `images`' shape) to the four outputs."""
    g = _G()
    bounds = np.cumsum([0, *per_level])
    parts = [_level(g, NET_OUTPUTS[0], NET_OUTPUTS[1], anchors, int(a0), int(a1), num_classes, clip, size)
             for a0, a1 in zip(bounds[:-1], bounds[1:])]
    boxes = g.op("Concat", *[p[0] for p in parts], axis=1)  # (N, K, 4)
    scores = g.op("Concat", *[p[1] for p in parts], axis=1)  # (N, K)
    labels = g.op("Concat", *[p[2] for p in parts], axis=1)  # (N, K)
    # NMS per class (batched_nms): each candidate scored only in its own class's row.
    mine = g.op("Equal", g.op("Unsqueeze", labels, g.const([1], np.int64)),
                g.const(np.arange(num_classes).reshape(1, -1, 1), np.int64))
    per_class = g.op("Where", mine, g.op("Unsqueeze", scores, g.const([1], np.int64)), g.const(0.0, np.float32))
    total = int(sum(min(TOPK_PER_LEVEL, n * num_classes) for n in per_level))
    sel = g.op("NonMaxSuppression", boxes, per_class, g.const([total], np.int64), g.const([IOU], np.float32),
               g.const([CANDIDATE], np.float32))  # (M, 3): image, class, candidate
    where = g.op("Gather", sel, g.const([0, 2], np.int64), axis=1)  # (M, 2): image, candidate
    kept = g.op("ScatterND", g.op("Mul", scores, g.const(0.0, np.float32)), where, g.op("GatherND", scores, where))
    best, idx = g.op("TopK", kept, g.const([min(PER_IMAGE, total)], np.int64), axis=1, largest=1, sorted=1,
                     outputs=2)
    out_boxes = g.op("GatherND", boxes, g.op("Unsqueeze", idx, g.const([2], np.int64)), batch_dims=1)
    out_labels = g.op("GatherElements", labels, idx, axis=1)
    thr = g.op("Gather", g.const(np.asarray(thresholds, np.float32), np.float32), out_labels, axis=0)
    chosen = g.op("And", g.op("Greater", best, g.const(0.0, np.float32)), g.op("GreaterOrEqual", best, thr))
    for name, src in zip(OUTPUTS, (_to_original(g, out_boxes, size), best, out_labels, chosen)):
        g.nodes.append(helper.make_node("Identity", [src], [name]))
    return g


def detector_onnx(model: Detector, size: int, thresholds, front: onnx.ModelProto) -> onnx.ModelProto:
    """The whole detector as one graph. `front` maps uint8 `images` of any size
    to uint8 `resized` (N, S, S, 3): the letterbox (deploy/resize_graph.py)."""
    from onnx import version_converter

    clip = settings(model)["clip"]
    anchors, per_level = anchors_of(model, size)
    net = trace_to_onnx(Network(model.eval()), torch.zeros(1, size, size, 3, dtype=torch.uint8), [INPUT],
                        list(NET_OUTPUTS))
    net = version_converter.convert_version(net, OPSET)
    prefix = onnx.compose.add_prefix(net, "net/")
    # The network reads the letterbox's output and keeps its outputs' names.
    renamed = {"net/" + INPUT: front.graph.output[0].name, **{"net/" + o: o for o in NET_OUTPUTS}}
    for n in prefix.graph.node:
        n.input[:] = [renamed.get(x, x) for x in n.input]
        n.output[:] = [renamed.get(x, x) for x in n.output]
    post = postprocess_graph(anchors, per_level, model.num_classes, size, clip, thresholds)
    graph = helper.make_graph(
        list(front.graph.node) + list(prefix.graph.node) + post.nodes, "imgclf_detector",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", "d", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "d"]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["n", "d"]),
         helper.make_tensor_value_info("selected", TensorProto.BOOL, ["n", "d"])],
        list(front.graph.initializer) + list(prefix.graph.initializer) + post.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def match(ref: tuple, got: tuple, score_atol: float, min_iou: float, floor: float) -> dict:
    """Detections of one image, (boxes, scores, labels) each, compared: every
    detection of either that scores above floor + score_atol (away from the
    candidate cut, where a 1e-6 difference may keep one and drop the other)
    must have a partner in the other of the same class with IoU >= min_iou
    and a score within score_atol. Returns the counts and the worst figures."""
    rb, rs, rl = (np.asarray(v) for v in ref)
    gb, gs, gl = (np.asarray(v) for v in got)
    iou = _iou(rb.reshape(-1, 4), gb.reshape(-1, 4))
    same = (rl[:, None] == gl[None, :]) & (np.abs(rs[:, None] - gs[None, :]) <= score_atol) & (iou >= min_iou)
    worst_iou, worst_score, used = 1.0, 0.0, set()
    missing = 0
    for i in np.argsort(-rs, kind="stable"):
        js = [j for j in np.flatnonzero(same[i]) if j not in used]
        if js:
            j = max(js, key=lambda j: iou[i, j])
            used.add(j)
            worst_iou, worst_score = min(worst_iou, float(iou[i, j])), max(worst_score, float(abs(rs[i] - gs[j])))
        elif rs[i] > floor + score_atol:
            missing += 1
    extra = sum(1 for j in range(len(gs)) if j not in used and gs[j] > floor + score_atol)
    return {"reference": int(len(rs)), "exported": int(len(gs)), "matched": len(used), "missing": missing,
            "extra": extra, "min_iou": worst_iou, "max_score_diff": worst_score}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), (union == 0) * 1.0)
