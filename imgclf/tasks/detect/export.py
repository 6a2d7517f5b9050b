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

With a mask branch (instance masks) the graph also gives `masks` (N, D, 28,
28): each detection's mask probabilities inside its box, at the branch's own
resolution, for its own class (Mask R-CNN's head on P3-P5 at the detected
boxes, as `Detector.predict` computes them; `MaskGraph` below, traced). Only
the real rows (score > 0) go through the branch; padding rows are zeros. An
engine pastes them into the image (predictor.py's `paste`, torch-free).

Rows are best first; a row with score 0 is padding (every real detection
scores above 0.05). `selected` is score >= its class's threshold (chosen on
val at training time, also in the metadata): an app needs no logic of its
own; `imgclf predict`/`serve` apply the thresholds (or --conf) themselves.
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torchvision.ops import roi_align

from imgclf.errors import ExportError
from imgclf.models.same_pad import trace_to_onnx
from imgclf.tasks.detect.masks import RESOLUTION
from imgclf.tasks.detect.model import Detector
from imgclf.tasks.detect.predictor import paste

INPUT = "images"
OUTPUTS = ("boxes", "scores", "labels", "selected")
NET_OUTPUTS = ("cls_logits", "bbox_regression")
PYRAMID = ("pyramid_p3", "pyramid_p4", "pyramid_p5")  # what the mask branch pools from
MASK_IN, MASK_OUT, MASK_PREFIX = ("mask_rois", "mask_labels"), "mask_probs", "masks/head/"
# Mask parity: each matched detection's mask (pasted, at 0.5) from the graph
# against PyTorch's, as IoU. Probabilities agree to about 1e-4, so only pixels at
# 0.5 itself or at a box edge moved by the matched box (IoU >= 0.99) can flip.
MIN_MASK_IOU = 0.9
OPSET = 18  # the letterbox's Resize(antialias) needs 18; TopK, GatherND(batch_dims), NonMaxSuppression are older
TOPK_PER_LEVEL, IOU, CANDIDATE, PER_IMAGE = 1000, 0.5, 0.05, 300  # = the head's settings (checked in `settings`)


class Network(nn.Module):
    """uint8 (N, S, S, 3) -> the head's raw outputs, as `Detector.predict`
    computes them (x / 255, the trunk, FPN, head); no anchors, no postprocess."""

    def __init__(self, model: Detector, masks: bool = False):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).float() / 255
        feats = self.model.forward_features(x)
        fpn = self.model.det.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        pyramid = list(fpn.values())
        head = self.model.det.head(pyramid)
        return (head["cls_logits"], head["bbox_regression"], *(pyramid[:len(PYRAMID)] if self.masks else ()))


class MaskGraph(nn.Module):
    """The mask branch for the graph: P3-P5 and rois (M, 5: image, x1, y1,
    x2, y2 in input pixels) with their labels (M,) -> (M, 28, 28)
    probabilities of each roi's own class. torchvision's MultiScaleRoIAlign
    takes a list of boxes per image; here every roi is pooled on each level
    and each keeps its own level's (the pooler's level mapper), which is what
    the pooler computes, in a form the tracer keeps for any number of rois."""

    def __init__(self, model: Detector, pyramid: list[torch.Tensor], size: int):
        super().__init__()
        self.head = model.mask_branch
        pool = self.head.pool
        if pool.scales is None:  # the pooler sets its scales and level mapper on its first call
            with torch.no_grad():
                pool(OrderedDict((str(i), p) for i, p in enumerate(pyramid)), [torch.zeros(1, 4)], [(size, size)])
        self.scales, self.mapper = list(pool.scales), pool.map_levels

    def forward(self, p3, p4, p5, rois, labels):
        pool = self.head.pool
        level = self.mapper([rois[:, 1:]])[:, None, None, None]
        x = None
        for k, (feat, scale) in enumerate(zip((p3, p4, p5), self.scales)):
            y = roi_align(feat, rois, pool.output_size, spatial_scale=scale, sampling_ratio=pool.sampling_ratio)
            x = y if x is None else torch.where(level == k, y, x)
        logits = self.head.logits(self.head.convs(x))  # (M, C, 28, 28)
        pick = labels[:, None, None, None].expand(-1, 1, *logits.shape[2:])
        return logits.gather(1, pick)[:, 0].sigmoid()


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
        self.split = None  # with masks: where the mask branch's nodes go (after its inputs, before its readers)

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
                      thresholds, masks: bool = False) -> _G:
    """The nodes from the network's outputs (and `images`' shape) to the four
    outputs; with masks, also the mask branch's inputs (MASK_IN) and, from
    its output (MASK_OUT, added after g.split), `masks`."""
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
    if masks:
        _mask_rows(g, out_boxes, best, out_labels)
    return g


def _mask_rows(g: _G, boxes: str, scores: str, labels: str) -> None:
    """The real rows (score > 0) as the branch's rois and labels; after
    g.split, their probabilities scattered back into (N, D, 28, 28) zeros."""
    where = g.op("Transpose", g.op("NonZero", g.op("Greater", scores, g.const(0.0, np.float32))))  # (M, 2)
    image = g.op("Cast", g.op("Gather", where, g.const([0], np.int64), axis=1), to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Concat", [image, g.op("GatherND", boxes, where)], [MASK_IN[0]], axis=1))
    g.nodes.append(helper.make_node("GatherND", [labels, where], [MASK_IN[1]]))
    g.split = len(g.nodes)
    shape = g.op("Concat", g.op("Shape", scores), g.const([RESOLUTION, RESOLUTION], np.int64), axis=0)
    zeros = g.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.zeros(1, np.float32)))
    g.nodes.append(helper.make_node("ScatterND", [zeros, where, MASK_OUT], ["masks"]))


def detector_onnx(model: Detector, size: int, thresholds, front: onnx.ModelProto,
                  masks: bool | None = None) -> onnx.ModelProto:
    """The whole detector as one graph. `front` maps uint8 `images` of any size
    to uint8 `resized` (N, S, S, 3): the letterbox (deploy/resize_graph.py).
    masks: the `masks` output too (default: when the model has a mask branch)."""
    from onnx import version_converter

    masks = model.mask_branch is not None if masks is None else masks and model.mask_branch is not None
    clip = settings(model)["clip"]
    anchors, per_level = anchors_of(model, size)
    outs = list(NET_OUTPUTS) + (list(PYRAMID) if masks else [])
    net = trace_to_onnx(Network(model.eval(), masks), torch.zeros(1, size, size, 3, dtype=torch.uint8), [INPUT], outs)
    net = version_converter.convert_version(net, OPSET)
    prefix = onnx.compose.add_prefix(net, "net/")
    # The network reads the letterbox's output and keeps its outputs' names.
    renamed = {"net/" + INPUT: front.graph.output[0].name, **{"net/" + o: o for o in outs}}
    for n in prefix.graph.node:
        n.input[:] = [renamed.get(x, x) for x in n.input]
        n.output[:] = [renamed.get(x, x) for x in n.output]
    post = postprocess_graph(anchors, per_level, model.num_classes, size, clip, thresholds, masks)
    nodes, inits = post.nodes, list(post.inits)
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", "d", 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "d"]),
               helper.make_tensor_value_info("labels", TensorProto.INT64, ["n", "d"]),
               helper.make_tensor_value_info("selected", TensorProto.BOOL, ["n", "d"])]
    if masks:
        branch = mask_onnx(model, size)
        nodes = nodes[:post.split] + list(branch.graph.node) + nodes[post.split:]
        inits += list(branch.graph.initializer)
        outputs.append(helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["n", "d", RESOLUTION, RESOLUTION]))
    graph = helper.make_graph(list(front.graph.node) + list(prefix.graph.node) + nodes, "imgclf_detector",
                              [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["n", "h", "w", 3])], outputs,
                              list(front.graph.initializer) + list(prefix.graph.initializer) + inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mask_onnx(model: Detector, size: int) -> onnx.ModelProto:
    """MaskGraph traced (rois dynamic in number), its names prefixed
    MASK_PREFIX but for its inputs (the pyramid, MASK_IN) and its output
    (MASK_OUT). The prefix holds "/head/", so INT8 keeps the branch in float
    as it keeps the box head (DET_INT8_RECIPE's float layers)."""
    with torch.no_grad():
        pyramid = [p.zero_() for p in model.forward(torch.zeros(1, 3, size, size))["pyramid"][:len(PYRAMID)]]
    example = (*pyramid, torch.tensor([[0.0, 0, 0, size / 2, size / 2]]), torch.zeros(1, dtype=torch.int64))
    names = [*PYRAMID, *MASK_IN]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(MaskGraph(model, pyramid, size).eval(), example, buf, input_names=names, output_names=[MASK_OUT],
                          dynamic_axes={**{n: {0: "n"} for n in PYRAMID}, **{n: {0: "m"} for n in MASK_IN},
                                        MASK_OUT: {0: "m"}}, opset_version=OPSET, dynamo=False)
    keep = {*names, MASK_OUT}
    branch = onnx.load_from_string(buf.getvalue())
    prefixed = onnx.compose.add_prefix(branch, MASK_PREFIX)
    cut = len(MASK_PREFIX)
    for n in prefixed.graph.node:
        n.input[:] = [x[cut:] if x[cut:] in keep else x for x in n.input]
        n.output[:] = [x[cut:] if x[cut:] in keep else x for x in n.output]
    return prefixed


def match(ref: tuple, got: tuple, score_atol: float, min_iou: float, floor: float) -> dict:
    """Detections of one image, (boxes, scores, labels) each, compared: every
    detection of either that scores above floor + score_atol (away from the
    candidate cut, where a 1e-6 difference may keep one and drop the other)
    must have a partner in the other of the same class with IoU >= min_iou
    and a score within score_atol. Returns the counts and the worst figures."""
    rb, rs, rl = (np.asarray(v) for v in ref[:3])
    gb, gs, gl = (np.asarray(v) for v in got[:3])
    iou = _iou(rb.reshape(-1, 4), gb.reshape(-1, 4))
    same = (rl[:, None] == gl[None, :]) & (np.abs(rs[:, None] - gs[None, :]) <= score_atol) & (iou >= min_iou)
    worst_iou, worst_score, used, pairs = 1.0, 0.0, set(), []
    missing = 0
    for i in np.argsort(-rs, kind="stable"):
        js = [j for j in np.flatnonzero(same[i]) if j not in used]
        if js:
            j = max(js, key=lambda j: iou[i, j])
            used.add(j), pairs.append((int(i), int(j)))
            worst_iou, worst_score = min(worst_iou, float(iou[i, j])), max(worst_score, float(abs(rs[i] - gs[j])))
        elif rs[i] > floor + score_atol:
            missing += 1
    extra = sum(1 for j in range(len(gs)) if j not in used and gs[j] > floor + score_atol)
    return {"reference": int(len(rs)), "exported": int(len(gs)), "matched": len(used), "missing": missing,
            "extra": extra, "min_iou": worst_iou, "max_score_diff": worst_score, "pairs": pairs}


def mask_parity(ref_out: list[tuple], got_out: list[tuple], per: list[dict], size: int) -> dict:
    """Instance masks of the matched detections (`match`'s pairs), each
    pasted at 0.5 into the size x size input with its own engine's box, as
    IoU; and the largest difference of their 28 x 28 probabilities. {} when
    the reference has no masks; IoU 0 for every pair the graph gave none."""
    if not any(len(r) > 3 for r in ref_out):
        return {}
    ious, diff = [], 0.0
    for r, g, p in zip(ref_out, got_out, per):
        for i, j in p["pairs"]:
            if len(g) <= 3:
                ious.append(0.0)
                continue
            a, b = (paste(o[3][k:k + 1], o[0][k:k + 1], size, size)[0] for o, k in ((r, i), (g, j)))
            union = np.logical_or(a, b).sum()
            ious.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
            diff = max(diff, float(np.abs(r[3][i] - g[3][j]).max()))
    return {"masks_compared": len(ious), "mask_min_iou": min(ious, default=1.0),
            "mask_mean_iou": float(np.mean(ious)) if ious else 1.0, "mask_max_prob_diff": diff}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), (union == 0) * 1.0)
