"""Grad-CAM (Selvaraju et al., 2017): where in the image the predicted class's
evidence lies, from the gradients at the backbone's last convolutional
feature map.

The target layer is found generically: the last module, in execution order,
whose output is still a spatial map (4-D, larger than 1x1) and that is not a
pooling layer. That is `bn2` (after `conv_head`) for timm's EfficientNet-Lite,
`layer4` for torchvision's ResNet, the last features block for MobileNet and
the last ReLU of small_cnn.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imgclf.data.preprocess import normalize, to_chw


def find_target_layer(backbone: nn.Module, size: int) -> tuple[str, nn.Module]:
    """(name, module) of the last non-pooling module producing a spatial map."""
    order: list[tuple[str, nn.Module, tuple]] = []
    hooks = []
    for name, mod in backbone.named_modules():
        if name == "":
            continue
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, name=name: order.append((name, m, tuple(o.shape) if torch.is_tensor(o) else ()))))
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    for name, mod, shape in reversed(order):
        if len(shape) == 4 and shape[2] * shape[3] > 1 and "pool" not in type(mod).__name__.lower():
            return name, mod
    raise ValueError("no convolutional feature map in this backbone: Grad-CAM needs a CNN")


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Heatmap in [0, 1] at the input's resolution for class `target`; `x` is
    one normalised image (1, 3, H, W)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        store["act"] = out
        out.register_hook(lambda g: store.__setitem__("grad", g))

    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # gradients flow even when the weights are frozen
            logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        h.remove()
    act, grad = store["act"].detach()[0], store["grad"].detach()[0]
    weights = grad.mean(dim=(1, 2))  # global-average-pooled gradients: one weight per channel
    cam = torch.relu((weights[:, None, None] * act).sum(0))
    cam = torch.nn.functional.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max()).numpy() if float(cam.max()) > 0 else cam.numpy()


def overlay(img_uint8_chw: torch.Tensor, cam: np.ndarray, alpha: float = 0.45):
    """The (preprocessed) image with the heatmap blended over it, as a PIL image."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = img_uint8_chw.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    heat = colormaps["jet"](cam)[..., :3]
    out = (1 - alpha) * rgb + alpha * heat
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def gradcam_images(clf, root: str, samples: list[dict]) -> list[dict]:
    """For each sample ({path, pred_idx, ...}), a Grad-CAM overlay for the
    predicted class (PIL image under "image"). Runs the torch model on CPU
    copies so the feature extractor's state is left alone."""
    import copy
    from pathlib import Path


    if not samples:
        return []
    from PIL import Image

    pp = clf.preprocess
    model = copy.deepcopy(clf.model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    out = []
    # One image at a time is too little work to share: on a busy 2-core
    # machine, synchronising two threads made each backward pass many times
    # slower than one thread alone.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        name, layer = find_target_layer(model.backbone, pp.size)
        for s in samples:
            img = to_chw(pp.load(Path(root) / s["path"]))
            cam = gradcam(model, layer, normalize(img[None], pp).float(), int(s["pred_idx"]))
            out.append({**s, "image": overlay(img, cam), "input": Image.fromarray(img.permute(1, 2, 0).numpy()),
                        "layer": name})
    finally:
        torch.set_num_threads(threads)
    return out
