"""Input pipeline and feature extraction choices, measured.

  .venv/bin/python bench/bench_pipeline.py

Table 1: decode + resize to 224 + normalise on dogs_vs_cats_2k_fullres (real
~500x375 JPEGs): imgclf's loader (JPEG draft decoding, reduced-gap resize,
uint8 transfer, batch normalisation) against torchvision ImageFolder with
default PIL loading and the standard transforms, same worker counts.
Table 2: frozen EfficientNet-Lite0 feature extraction at 224 px: eager
PyTorch (contiguous, channels_last) against onnxruntime, by batch size.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import DATASETS, machine, table


def loader_rate(kind: str, workers: int, limit: int) -> float:
    from torch.utils.data import DataLoader, Subset

    from imgclf.data.datasets import discover
    from imgclf.data.loading import ImageDataset, collate
    from imgclf.data.preprocess import Preprocess, eval_transform, normalize

    root = DATASETS / "dogs_vs_cats_2k_fullres"
    pp = Preprocess(size=224)
    if kind == "imgclf":
        s = discover(root, 0, 0)
        ds = ImageDataset(s.root, (s.train + s.val + s.test)[:limit], eval_transform(pp), draft_size=pp.draft_size)
        dl = DataLoader(ds, batch_size=32, num_workers=workers, collate_fn=collate)
        post = lambda b: normalize(b[0], pp)  # noqa: E731
    else:
        from torchvision import datasets
        from torchvision import transforms as T

        tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        ds = Subset(datasets.ImageFolder(str(root), tf), range(limit))
        dl = DataLoader(ds, batch_size=32, num_workers=workers)
        post = lambda b: b[0]  # noqa: E731
    t0, n = time.time(), 0
    for b in dl:
        n += len(post(b))
    return n / (time.time() - t0)


def extraction_rate(engine: str, bs: int, n: int = 128) -> float:
    import io
    import warnings

    from imgclf.models.registry import build_model

    m = build_model("efficientnet_lite0", 2, pretrained=True).backbone.eval()
    x = torch.randn(bs, 3, 224, 224)
    if engine == "onnxruntime":
        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, x[:1], buf, input_names=["x"], output_names=["f"], dynamic_axes={"x": {0: "n"}},
                              opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        f = lambda: sess.run(None, {"x": x.numpy()})  # noqa: E731
    else:
        if engine == "torch channels_last":
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        f = lambda: m(x)  # noqa: E731
    with torch.inference_mode():
        f()
        t0, done = time.time(), 0
        while done < n:
            f()
            done += bs
    return done / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    a = ap.parse_args()
    print(f"machine: {machine()}\n")
    rows = []
    for workers in (0, 1, 2):
        base = loader_rate("imagefolder", workers, a.images)
        ours = loader_rate("imgclf", workers, a.images)
        rows.append({"workers": workers, "ImageFolder + PIL (img/s)": f"{base:.0f}", "imgclf loader (img/s)": f"{ours:.0f}",
                     "speed-up": f"{ours / base:.2f}x"})
    print(f"decode + resize 224 + normalise, dogs_vs_cats_2k_fullres, first {a.images} images, batch 32")
    print(table(rows, list(rows[0])))
    rows = []
    for bs in (8, 32):
        r = {"batch": bs}
        for eng in ("torch", "torch channels_last", "onnxruntime"):
            r[f"{eng} (img/s)"] = f"{extraction_rate(eng, bs):.1f}"
        rows.append(r)
    print("\nEfficientNet-Lite0 backbone forward, 224 px, random input")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
