"""Issue 12, goal 1 lever: partial fine-tuning on cached activations.

    .venv/bin/python bench/bench_partial_ft.py [--epochs 6] [--seeds 2]

The default's backbone (EfficientNet-Lite1, 208 of 240 px) is cut before its
last layer, the 1x1 "head" convolution (320 -> 1280 channels) with its batch
norm: everything before the cut runs once per image through onnxruntime (the
same export as the feature cache), and its 320 x 7 x 7 activations are kept in
memory. Then the last layer, the global pool and the linear head train for a
fixed number of epochs on those activations (AdamW; the last layer at a tenth
of the head's learning rate; mirrored activation maps at random as the only
augmentation; label smoothing 0.1; the last batch norm's running statistics
frozen unless --bn train), starting from the default run's head: the
linear head fitted by cross-validation on the frozen features. Validation
accuracy is printed after every epoch and nothing is chosen on it: the table
shows every epoch, against the frozen features' CV head in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, machine, table  # noqa: E402


def trunk_session(backbone, size: int):
    """Everything before conv_head, exported as imgclf exports (folded padding), in onnxruntime."""
    from imgclf.models.same_pad import trace_to_onnx
    from imgclf.ort import ort_session

    trunk = torch.nn.Sequential(backbone.conv_stem, backbone.bn1, backbone.blocks).eval()
    graph = trace_to_onnx(trunk, torch.zeros(1, 3, size, size), ["x"], ["a"])
    return ort_session(graph.SerializeToString(), torch.get_num_threads())


def activations(sess, root, items, pp) -> tuple[torch.Tensor, torch.Tensor]:
    from imgclf.data.loading import ImageDataset, make_loader
    from imgclf.data.preprocess import eval_transform, normalize

    ds = ImageDataset(root, items, eval_transform(pp), draft_size=pp.draft_size)
    acts, ys = [], []
    for x, y, _, _ in make_loader(ds, 32, False, 1):
        for i in range(0, len(x), 16):
            acts.append(torch.from_numpy(sess.run(None, {"x": normalize(x[i:i + 16], pp).numpy()})[0]))
        ys.append(y)
    return torch.cat(acts), torch.cat(ys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bn", choices=("frozen", "train"), default="frozen",
                    help="frozen: bn2 keeps ImageNet's running statistics (its scale and shift still train)")
    a = ap.parse_args()
    from imgclf.data.datasets import discover
    from imgclf.models.registry import build_model, get_model_info
    from imgclf.training.head_fit import fit_head_cv
    from imgclf.training.loop import make_loss

    torch.set_num_threads(2)
    name = "efficientnet_lite1"
    pp = get_model_info(name).preprocess
    splits = discover(str(DATASETS / "cats_and_dogs_filtered"), 0.1, 0.0, 0, False)
    bb = build_model(name, 2, pretrained=True).backbone.eval()
    t0 = time.time()
    sess = trunk_session(bb, pp.size)
    A, Y = activations(sess, splits.root, splits.train, pp)
    Av, Yv = activations(sess, splits.root, splits.val, pp)
    t_act = time.time() - t0
    print(f"{machine()}; activations {tuple(A.shape)} + {tuple(Av.shape)} in {t_act:.1f} s", flush=True)

    def top(m, x):  # conv_head -> bn2 (+ReLU6) -> global pool
        return m.global_pool(m.bn2(m.conv_head(x)))

    rows = []
    for seed in range(a.seeds):
        m = build_model(name, 2, pretrained=True).backbone
        with torch.inference_mode():
            F, Fv = top(m.eval(), A), top(m, Av)
        fit = fit_head_cv(F, Y, 1, 5, seed)
        head = torch.nn.Linear(F.shape[1], 2)
        with torch.no_grad():
            head.weight.copy_(fit.weight)
            head.bias.copy_(fit.bias)
        acc0 = ((Fv @ fit.weight.T + fit.bias).argmax(1) == Yv).float().mean().item()
        rows.append({"seed": seed, "epoch": 0, "what": "frozen features, CV head (the default)",
                     "val acc": f"{acc0:.4f}", "s": ""})
        params = [{"params": list(m.conv_head.parameters()) + list(m.bn2.parameters()), "lr": a.lr / 10},
                  {"params": head.parameters(), "lr": a.lr}]
        opt = torch.optim.AdamW(params, weight_decay=0.01)
        loss_fn, gen = make_loss(None, 0.1), torch.Generator().manual_seed(seed)
        for ep in range(1, a.epochs + 1):
            t = time.time()
            m.train()
            if a.bn == "frozen":
                m.bn2.eval()
            for idx in torch.randperm(len(A), generator=gen).split(64):
                x = A[idx]
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                loss = loss_fn(head(top(m, x)), Y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            m.eval()
            with torch.inference_mode():
                acc = (head(top(m, Av)).argmax(1) == Yv).float().mean().item()
            rows.append({"seed": seed, "epoch": ep, "what": "conv_head + bn2 + head on cached activations",
                         "val acc": f"{acc:.4f}", "s": f"{time.time() - t:.1f}"})
            print(rows[-1], flush=True)
    print(table(rows, ["seed", "epoch", "what", "val acc", "s"]))


if __name__ == "__main__":
    main()
