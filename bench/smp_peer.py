"""The peer of bench_segment.py: segmentation-models-pytorch's U-Net, run in
its own virtual environment (never a dependency of imgclf), e.g.

    /work/smp-venv/bin/python bench/smp_peer.py SPEC.json RESULT.json

SPEC (written by bench_segment.py): the train/val/test image and mask paths
(imgclf's own split of the same run), the ignore value, the classes, the
image size and crop, the time budget, the seed, and a state dict of the
EfficientNet-Lite0 ImageNet weights in timm's naming. The encoder is smp's
timm-universal "tu-tf_efficientnet_lite0", into which those weights load.
Its recipe is smp's CamVid example: Adam at 1e-4, Dice loss, every layer
training; the augmentation is imgclf's (scale, crop, flip, colour), so
only the network and its recipe differ. Early stopping keeps the epoch with
the best val mIoU; the test split is scored once, each image whole, logits
resized to the mask's resolution: the same confusion-matrix mIoU as imgclf.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2


def base(img: Image.Image, size: int, resample) -> Image.Image:
    s = size / max(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), resample)


def load(pairs, size):
    xs, ys = [], []
    for im, mk in pairs:
        xs.append(torch.from_numpy(np.array(base(Image.open(im).convert("RGB"), size, Image.BILINEAR))).permute(2, 0, 1))
        ys.append(torch.from_numpy(np.array(base(Image.open(mk), size, Image.NEAREST))))
    return xs, ys


def confusion(t, p, k, ignore):
    t, p = t.ravel().astype(np.int64), p.ravel().astype(np.int64)
    keep = (t != ignore) & (t < k)
    return np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)


def miou(cm):
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou))


@torch.inference_mode()
def score(model, pairs, size, k, ignore):
    model.eval()
    cm = np.zeros((k, k), np.int64)
    for im, mk in pairs:
        x = torch.from_numpy(np.array(base(Image.open(im).convert("RGB"), size, Image.BILINEAR))).permute(2, 0, 1)
        h, w = x.shape[-2:]
        ph, pw = -h % 32, -w % 32  # U-Net needs sides divisible by 32: pad, then cut the logits back
        xp = F.pad(x[None].float() / 255, (0, pw, 0, ph))
        lg = model((xp - 0.5) / 0.5)[..., :h, :w]
        truth = np.asarray(Image.open(mk))
        up = F.interpolate(lg, size=truth.shape, mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        cm += confusion(truth, up, k, ignore)
    return cm


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec.get("threads", 2))
    t0 = time.time()
    k, ignore, size, crop = len(spec["classes"]), spec["ignore_index"], spec["image_size"], spec["crop"]
    model = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=k)
    sd = torch.load(spec["lite_weights"], weights_only=True)
    res = model.encoder.model.load_state_dict(sd, strict=False)
    loaded = len(sd) - len(res.unexpected_keys)
    xs, ys = load(spec["train"], size)
    tf = v2.Compose([v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore}),
                     v2.RandomHorizontalFlip(), v2.ColorJitter(0.3, 0.3, 0.3, 0.02),
                     v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                                scale=True)])
    loss_fn = smp.losses.DiceLoss("multiclass", ignore_index=ignore)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    best, best_state, history, bs = -1.0, None, [], spec["batch_size"]
    for epoch in range(spec["epochs"]):
        if time.time() - t0 > spec["budget"]:
            break
        model.train()
        order = torch.randperm(len(xs)).tolist()
        for i in range(0, len(order) - bs + 1, bs):
            batch = []
            for j in order[i:i + bs]:
                s = float(torch.empty(1).uniform_(0.75, 1.5))
                h, w = xs[j].shape[-2:]
                r = v2.Resize((round(h * s), round(w * s)), antialias=True)
                batch.append(tf(*r(tv_tensors.Image(xs[j]), tv_tensors.Mask(ys[j]))))
            x = torch.stack([b[0] for b in batch])
            y = torch.stack([b[1] for b in batch])
            loss = loss_fn(model((x - 0.5) / 0.5), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.time() - t0 > spec["budget"]:
                break
        m = miou(score(model, spec["val"], size, k, ignore))
        history.append({"epoch": epoch + 1, "val_miou": round(m, 4), "seconds": round(time.time() - t0, 1)})
        print(json.dumps(history[-1]), flush=True)
        if m > best:
            best, best_state = m, copy.deepcopy(model.state_dict())
    train_s = time.time() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    cm = score(model, spec["test"], size, k, ignore)
    json.dump({"confusion_matrix": cm.tolist(), "history": history, "train_seconds": round(train_s, 1),
               "wall_seconds": round(time.time() - t0, 1), "encoder": "tu-tf_efficientnet_lite0",
               "encoder_weights_loaded": loaded, "encoder_weights_given": len(sd),
               "unexpected_keys": res.unexpected_keys[:8], "missing_keys": len(res.missing_keys),
               "smp": smp.__version__}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
