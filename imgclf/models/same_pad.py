"""TensorFlow's 'SAME' padding, made static for ONNX exports.

timm's tf_efficientnet_lite* pad their stride-2 convolutions as TensorFlow
does: one pixel more at the bottom and right than at the top and left, worked
out from the input's size on every call (timm's Conv2dSame). Exported as is,
each such convolution becomes a Shape/Ceil/... subgraph and a Pad node before
the Conv. onnxruntime's CPU provider does not fuse that Pad, and each one
breaks its blocked-layout (NCHWc) chain with two reorders: a large share of
the graph's time on CPU.

An export has a fixed input size, so the pads are constants:
`static_same_padding` fixes them in PyTorch (the same numbers), and
`fold_pads_into_convs` moves each zero Pad into its Conv's own, asymmetric,
`pads` attribute. Outputs stay bit-identical; the speed-up is in
docs/benchmarks.md ("Goal 4, after folding the padding").
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class StaticSameConv(nn.Module):
    """A timm Conv2dSame whose padding is fixed by the first call's input size."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv, self.pad = conv, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.pad is None:  # plain ints, so that an export records constants, not shape arithmetic
            from timm.layers.padding import pad_same_arg

            self.pad = [int(v) for v in pad_same_arg([int(s) for s in x.shape[-2:]], list(c.weight.shape[-2:]),
                                                     c.stride, c.dilation)]
        return F.conv2d(F.pad(x, self.pad), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def static_same_padding(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of `module` (for export) with every Conv2dSame's padding fixed
    for inputs like `example`; the module itself is left as it is."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # no timm: no such layers
        return module
    if not any(isinstance(m, Conv2dSame) for m in module.modules()):
        return module
    out = copy.deepcopy(module)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, Conv2dSame):
                setattr(parent, name, StaticSameConv(child))
            else:
                swap(child)

    swap(out)
    with torch.inference_mode():
        out.eval()(example)  # fixes each layer's pads at this size
    return out


def trace_to_onnx(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str]):
    """`module` as an onnx.ModelProto (opset 17, batch dimension dynamic), its
    TF padding fixed and folded: the one way imgclf writes ONNX (the cached
    backbone, `imgclf export`)."""
    import io
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(static_same_padding(module, example), example, buf, input_names=inputs,
                          output_names=outputs, dynamic_axes={n: {0: "n"} for n in [*inputs, *outputs]},
                          opset_version=17, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    fold_pads_into_convs(graph)
    return graph


def fold_pads_into_convs(model) -> int:
    """Fold each constant zero Pad whose only reader is a Conv into that
    Conv's `pads` attribute, in place; returns how many were folded. The pads
    tensor is evaluated from its constant-only subgraph with onnx's reference
    evaluator; a Pad that depends on the input's shape is left alone."""
    from onnx import helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    order = {id(n): i for i, n in enumerate(g.node)}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    folded = []
    for pad in g.node:
        if pad.op_type != "Pad" or len(readers.get(pad.output[0], [])) != 1:
            continue
        conv = readers[pad.output[0]][0]
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if conv.op_type != "Conv" or mode != b"constant" or (len(pad.input) > 3 and pad.input[3]):
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") or a.name == "pads" and any(a.ints)
               for a in conv.attribute):
            continue
        pads = _constant(pad.input[1], producer, order, inits, model.opset_import)
        value = _constant(pad.input[2], producer, order, inits, model.opset_import) \
            if len(pad.input) > 2 and pad.input[2] else 0.0
        if pads is None or value is None or float(value) != 0.0:
            continue
        p = [int(v) for v in pads]  # [N, C, H, W begins, N, C, H, W ends]
        if len(p) != 8 or p[0] or p[1] or p[4] or p[5] or min(p) < 0:
            continue
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", [p[2], p[3], p[6], p[7]]))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        g.node.remove(pad)  # the constant subgraphs that fed them are left for onnxruntime to drop
    return len(folded)


def _constant(name: str, producer: dict, order: dict, inits: dict, opset):
    """The value of `name` if it is computed from constants alone, else None."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if name in inits:
        return numpy_helper.to_array(inits[name])
    nodes, stack, seen = [], [name], set()
    while stack:
        v = stack.pop()
        if not v or v in inits or v in seen:
            continue
        seen.add(v)
        if v not in producer:
            return None  # a graph input: not constant
        nodes.append(producer[v])
        stack.extend(producer[v].input)
    nodes.sort(key=lambda n: order[id(n)])
    used = [inits[i] for i in dict.fromkeys(i for n in nodes for i in n.input) if i in inits]
    sub = helper.make_model(helper.make_graph(nodes, "constant", [], [helper.make_value_info(name, onnx.TypeProto())],
                                              used), opset_imports=opset)
    return ReferenceEvaluator(sub).run(None, {})[0]
