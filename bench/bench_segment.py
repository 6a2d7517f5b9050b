"""Semantic segmentation on CamVid: imgclf's default `train` against the peer
(segmentation-models-pytorch's U-Net, bench/smp_peer.py, in its own venv)
on the same split, with the same time budget, in one run.

    python bench/bench_segment.py --seed 0      # the default `imgclf train CAMVID --ignore-index 11`
    python bench/bench_segment.py --seed 0 --peer /work/smp-venv/bin/python   # the peer gets imgclf's train seconds
    python bench/bench_segment.py --budget 600 --seed 0   # both with --time-budget 600

The split no choice saw: CamVid's val (101 frames) is the test split here;
imgclf carves its own val (for early stopping and the best epoch) from
CamVid's train (367 frames), and the peer gets exactly those lists. The
view is a folder of links: train/ + trainannot/ (CamVid train), test/ +
testannot/ (CamVid val). mIoU over the 11 classes, void (11) ignored, on
the full 480x360 masks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATASETS, machine  # noqa: E402

THIN = ("Pole", "SignSymbol", "Bicyclist")


def view(out: Path) -> Path:
    src, v = DATASETS / "camvid", out / "camvid_view"
    if v.exists():
        return v
    for a, b in (("train", "train"), ("trainannot", "trainannot"), ("val", "test"), ("valannot", "testannot")):
        (v / b).mkdir(parents=True)
        for f in sorted((src / a).iterdir()):
            (v / b / f.name).symlink_to(f)
    (v / "classes.txt").write_text((src / "classes.txt").read_text())
    return v


def run_imgclf(data: Path, out: Path, budget: float | None, seed: int, size: int | None,
               class_weights: str | None = None) -> dict:
    from imgclf.config import TrainConfig
    from imgclf.tasks import verbs

    t0, c0 = time.time(), time.process_time()
    s = verbs("segment").train(TrainConfig(data=str(data), out=str(out), ignore_index=11, time_budget=budget,
                                           seed=seed, image_size=size, class_weights=class_weights))
    ev = json.loads((out / "eval_test.json").read_text())
    crops = f"{s['plan']['cache_crop']} px crops of cached trunk maps" if s["plan"]["cached"] else "image crops"
    return {"tool": f"imgclf (loss {s['plan']['loss']})",
            "start": f"Lite0 ImageNet (offline), frozen trunk + FPN decoder, {s['plan']['image_size']} px, {crops}",
            "miou": ev["miou"],
            "pixel_accuracy": ev["pixel_accuracy"], "iou": ev["iou_per_class"], "epochs": s["epochs_run"],
            "train_s": s["train_seconds"], "wall_s": round(time.time() - t0, 1), "plan": s["plan"],
            "cpu_s": round(time.process_time() - c0, 1), "val_miou": s["best"].get("miou")}


def run_peer(python: str, data: Path, run: Path, out: Path, budget: float, seed: int, size: int) -> dict:
    import torch

    from imgclf.models.registry import get_model_info
    from imgclf.tasks.segment.data import read_dataset
    from imgclf.tasks.segment.metrics import scores

    ds = read_dataset(data, ignore_index=11)
    mask_of = {str(it.image): str(it.mask) for it in ds.items}
    sp = json.loads((run / "splits.json").read_text())
    net, _ = get_model_info("efficientnet_lite0").build(pretrained=True)
    torch.save(net.state_dict(), out / "lite0_timm.pt")
    spec = {s: [[p, mask_of[p]] for p in sp[s]] for s in ("train", "val", "test")}
    spec.update(classes=ds.classes, ignore_index=11, image_size=size, crop=size * 3 // 4 // 32 * 32, budget=budget,
                seed=seed, batch_size=8, epochs=200, lite_weights=str(out / "lite0_timm.pt"),
                threads=torch.get_num_threads())
    (out / "peer_spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    subprocess.run([python, str(Path(__file__).with_name("smp_peer.py")), str(out / "peer_spec.json"),
                    str(out / "peer_result.json")], check=True)
    r = json.loads((out / "peer_result.json").read_text())
    m = scores(r["confusion_matrix"], ds.classes)
    return {"tool": f"smp {r['smp']} U-Net", "start": f"Lite0 ImageNet in {r['encoder']} "
            f"({r['encoder_weights_loaded']}/{r['encoder_weights_given']} tensors; unused: conv_head, bn2), all layers",
            "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou_per_class"],
            "epochs": len(r["history"]), "train_s": r["train_seconds"], "wall_s": round(time.time() - t0, 1)}


def row(r: dict) -> str:
    thin = " / ".join(f"{r['iou'][c]:.3f}" for c in THIN)
    return (f"| {r['tool']} | {r['start']} | {r['miou']:.3f} | {thin} | {r['pixel_accuracy']:.3f} | {r['epochs']} | "
            f"{r['train_s']:.0f} | {r['wall_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=None, help="seconds (--time-budget); default: none, the "
                    "default `imgclf train` as a user runs it; the peer then gets imgclf's training seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None, help="base size (default: imgclf's, 480)")
    ap.add_argument("--peer", default=None, help="the python of a venv with segmentation-models-pytorch")
    ap.add_argument("--out", default="/tmp/bench_segment")
    ap.add_argument("--class-weights", default="default", help="imgclf's loss: default (imgclf's: auto) | none (CE) | "
                    "auto (CE, median-frequency class weights); several, comma-separated, run one after the other")
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = view(out)
    rows = []
    for cw in a.class_weights.split(","):
        run = out / f"imgclf_s{a.seed}_{int(a.budget or 0)}_{a.image_size or 'default'}_{cw}"
        rows.append(run_imgclf(data, run, a.budget, a.seed, a.image_size, None if cw == "default" else cw))
    if a.peer:
        r = rows[-1]
        rows.append(run_peer(a.peer, data, run, out, a.budget or r["train_s"], a.seed, r["plan"]["image_size"]))
    print(machine())
    print("| tool | start | test mIoU | IoU Pole / SignSymbol / Bicyclist | pixel acc. | epochs | train s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(row(r))
    for r in rows:
        print("RESULT", json.dumps(r))


if __name__ == "__main__":
    main()
