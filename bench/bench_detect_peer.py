"""imgclf's detector against the Ultralytics peer, in one run: the same
split, the same wall-clock budget, the same evaluator.

    python bench/bench_detect_peer.py run bccd 0            # `imgclf train`, then the peer in imgclf's wall time
    python bench/bench_detect_peer.py run pennfudan 0
    python bench/bench_detect_peer.py run bccd 0 --imgsz 640   # the peer at 640 px (imgclf at its own size)
    python bench/bench_detect_peer.py imgclf pennfudan 0 --strategy finetune --tag=-ft  # imgclf alone; other
                                                               # flags go to `imgclf train`
    python bench/bench_detect_peer.py peer pennfudan 0 --budget 344 --imgsz 320  # the peer alone
    python bench/bench_detect_peer.py infer bccd 0          # img/s: PyTorch eager and ONNX Runtime, batch 1 and 8
    python bench/bench_detect_peer.py table                 # the markdown rows of every result so far

The split is imgclf's (`split_dataset(read_dataset(...), seed=S)`), written
once as a YOLO folder (images hard-linked) that Ultralytics trains on with
val for its own checkpoint choice. Both detectors are scored on the test
images no choice saw by `imgclf.tasks.detect.metrics.coco_metrics`
(faster-coco-eval), from detections in the original images' pixels at
score >= 0.001, at most 300 per image.

Ultralytics is AGPL-3.0 and never a dependency of imgclf: it lives in its
own virtual environment (ULTRALYTICS_PYTHON, default /work/ul-venv/bin/python,
made by `python3.11 -m venv /work/ul-venv && /work/ul-venv/bin/pip install
torch==2.14.1 torchvision==0.29.1 ultralytics onnx onnxslim onnxruntime`)
and this file re-runs itself there (`peer-train`, `peer-infer`), importing
nothing of imgclf. No YOLO weights install offline, so the peer starts from
its yaml (random init). It runs offline: YOLO_OFFLINE=1 (no DNS probes, no
telemetry), YOLO_AUTOINSTALL=0 (no pip calls), its settings in its own
folder, a local font placed where its dataset check looks (it would
otherwise try to download Arial.ttf), plots=False.

One intra-op thread for both (Ultralytics picks min(8, cores - 1) = 1 on
this machine; imgclf's CLI runs with its `set_threads` replaced, see
BENCH_THREADS): on a contended 2-core machine more threads per process made
each step slower. The load average is recorded
beside every timing. Results are appended to WORK/results.jsonl
(IMGCLF_BENCH_WORK, default /tmp/imgclf-detpeer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATASETS, timed_cli  # noqa: E402

WORK = Path(os.environ.get("IMGCLF_BENCH_WORK", "/tmp/imgclf-detpeer"))
UL_PY = os.environ.get("ULTRALYTICS_PYTHON", "/work/ul-venv/bin/python")
FORMATS = {"bccd": None, "pennfudan": "masks"}
PEER_MODEL = {"bccd": "yolo11n.yaml", "pennfudan": "yolo11n-seg.yaml"}  # instance masks: the peer's -seg model
# imgclf's detection defaults as `imgclf train` sets them (frozen trunk, maps
# cached once per image and mirror, batch 4, 12 epochs, lr 2e-3).
IMGCLF_DEFAULTS = {"epochs": 12, "batch_size": 4, "lr": 2e-3, "image_size": 320, "cache": True}


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _record(row: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT", json.dumps(row), flush=True)


# --- the split, as imgclf makes it, and its YOLO copy ---------------------------

def split(name: str, seed: int):
    from imgclf.tasks.detect.check import split_dataset
    from imgclf.tasks.detect.formats import read_dataset

    ds = read_dataset(DATASETS / name, format=FORMATS[name])
    return ds, split_dataset(ds, seed=seed)


def prepare(name: str, seed: int) -> Path:
    """WORK/NAME-sSEED/yolo (train/val/test) and test.json (the test images'
    paths there, in imgclf's test order)."""
    import yaml

    from imgclf.tasks.detect.formats.write import write_yolo

    ds, sp = split(name, seed)
    out = WORK / f"{name}-s{seed}"
    tagged = [None] * len(ds.images)
    for s, idx in sp.items():
        for i in idx:
            tagged[i] = dataclasses.replace(ds.images[i], split=s)
    sub = dataclasses.replace(ds, images=[im for im in tagged if im is not None])
    if (out / "yolo").exists():
        shutil.rmtree(out / "yolo")
    write_yolo(sub, out / "yolo")
    # write_yolo's `path: .` is read by Ultralytics against the working
    # directory, not the yaml's folder: make it absolute.
    cfg = yaml.safe_load((out / "yolo" / "data.yaml").read_text())
    cfg["path"] = str((out / "yolo").resolve())
    (out / "yolo" / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    test = [str(out / "yolo" / "images" / "test" / ds.images[i].path.name) for i in sp["test"]]
    assert all(Path(p).is_file() for p in test), "write_yolo renamed a test image"
    (out / "test.json").write_text(json.dumps(test))
    if ds.images[0].mask_path is not None:  # instance masks: what the -seg peer turns into polygons
        label = {i: str(out / "yolo" / "labels" / s / (ds.images[i].path.stem + ".txt")) for s, idx in sp.items() for i in idx}
        (out / "masks.json").write_text(json.dumps([[label[i], str(ds.images[i].mask_path),
                                                     ds.images[i].labels.tolist()] for i in sorted(label)]))
    return out


def _test_subset(ds, items):
    from imgclf.tasks.detect.data import DetDataset

    return DetDataset(classes=ds.classes, images=[ds.images[i] for i in items], format=ds.format, root=ds.root)


def _scores(m: dict) -> dict:
    keep = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "ar100")
    masks = {k: round(m[k], 4) for k in ("mask_map", "mask_map50", "person_iou") if m.get(k) is not None}
    return {**{k: round(m[k], 4) for k in keep}, **masks,
            "ap50_per_class": {k: round(v, 4) for k, v in m["ap50_per_class"].items()}}


# --- imgclf ---------------------------------------------------------------------

# The CLI in a fresh process, as common.timed_cli runs it, but with the
# training's intra-op threads set to THREADS (imgclf uses every core, and on
# this contended 2-core machine two threads made a step several times slower).
_WRAP_THREADS = ("import sys, torch; import imgclf.tasks.detect.train as T; "
                 "T.set_threads = lambda *a, **k: torch.set_num_threads({threads}); "
                 "from imgclf.cli import main; rc = main(sys.argv[1:]); "
                 "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
                 "print('PEAK_RSS_KB', hwm); sys.exit(rc)")
THREADS = int(os.environ.get("BENCH_THREADS", 1))


def _timed_train(args: list[str]) -> tuple[float, float]:
    if THREADS == 0:  # imgclf's own choice
        wall, peak, _ = timed_cli(args)
        return wall, peak
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _WRAP_THREADS.format(threads=THREADS), *args], capture_output=True,
                       text=True)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"imgclf {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return wall, int(p.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 2**20


def run_imgclf(name: str, seed: int, flags: list[str] | None = None, tag: str = "") -> dict:
    """`imgclf train DATA --seed S` as a user runs it (a fresh process, its
    defaults unless `flags` say otherwise); its held-out figures are from the
    same evaluator on the same test images (checked against `split`)."""
    from imgclf.io import read_history
    from imgclf.runs import RunDir
    from imgclf.tasks.detect.splits import DetSplits

    flags = list(flags or [])
    ds, sp = split(name, seed)
    run = WORK / f"{name}-s{seed}" / f"imgclf{tag}"
    if run.exists():
        shutil.rmtree(run)
    load0 = _load()
    wall, peak = _timed_train(["train", str(DATASETS / name), "--out", str(run), "--seed", str(seed), *flags])
    summary = json.loads((run / "summary.json").read_text())
    theirs = DetSplits.read(RunDir(run)).indices(ds)
    assert {k: sorted(v) for k, v in theirs.items()} == {k: sorted(v) for k, v in sp.items()}, "not the same split"
    hist = read_history(RunDir(run).history_file)
    if ds.images[0].mask_path is not None:
        import imgclf

        test = _test_subset(ds, sp["test"])
        found = imgclf.load(run).detect([str(im.path) for im in test.images])  # at the run's thresholds
        summary["test"]["person_iou"] = person_iou(test, [f["masks"] for f in found])
    row = {"who": "imgclf", "data": name, "seed": seed, "flags": flags, "tag": tag, "threads": THREADS or "imgclf's", "n": {k: len(v) for k, v in sp.items()},
           "image_size": summary["image_size"], "epochs": summary["epochs_run"], "train_s": summary["seconds"],
           "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2), "load_before": load0, "load_after": _load(),
           "best_epoch": int(max(hist, key=lambda r: float(r["val_map"]))["epoch"]) if hist else None,
           "val_map50": round(summary["val"]["map50"], 4), "val_map": round(summary["val"]["map"], 4),
           "test": _scores(summary["test"]), "run": str(run),
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _record(row)
    return row


# --- the peer (the outer half runs here, the inner half in the Ultralytics venv) ---

def _peer_env(work: Path) -> dict:
    cfg = work / "ul-config"
    cfg.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(cfg),
            "YOLO_VERBOSE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def run_peer(name: str, seed: int, budget_s: float, imgsz: int = 320, model: str = "yolo11n.yaml",
             batch: int = 16, tag: str = "") -> dict:
    from imgclf.tasks.detect.metrics import coco_metrics

    out = prepare(name, seed)
    run = out / f"peer-{Path(model).stem}-{imgsz}{tag}"
    if run.exists():
        shutil.rmtree(run)
    load0, t0 = _load(), time.time()
    subprocess.run([UL_PY, __file__, "peer-train", str(out), str(run), str(budget_s), str(imgsz), model, str(batch),
                    str(seed)], check=True, env=_peer_env(WORK))
    wall = time.time() - t0
    got = json.loads((run / "result.json").read_text())
    ds, sp = split(name, seed)
    preds = [{"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for p in got["preds"]]
    test = _test_subset(ds, sp["test"])
    if "polygons" in got["preds"][0]:
        for p, q, im in zip(preds, got["preds"], test.images):
            p["masks"] = _raster(q["polygons"], *Image.open(im.path).size)
    m = coco_metrics(test, preds)
    if "masks" in preds[0]:  # Ultralytics' predict default: conf 0.25
        m["person_iou"] = person_iou(test, [[mk for mk, sc in zip(p["masks"], p["scores"]) if sc >= 0.25] for p in preds])
    row = {"who": "ultralytics", "data": name, "seed": seed, "model": model, "imgsz": imgsz, "batch": batch,
           "budget_s": round(budget_s, 1), "train_s": got["train_s"], "wall_s": round(wall, 1), "epochs": got["epochs"],
           "best_epoch": got["best_epoch"], "val_map50": got["val_map50"], "val_map": got["val_map"],
           "load_before": load0, "load_after": _load(), "test": _scores(m), "weights": got["weights"],
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _record(row)
    return row


def _raster(polygons: list[list[list[float]]], width: int, height: int) -> list[np.ndarray]:
    """The peer's mask polygons (original pixels) as bool masks."""
    out = []
    for poly in polygons:
        img = Image.new("L", (width, height), 0)
        if len(poly) >= 3:
            ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=1)
        out.append(np.asarray(img, bool))
    return out


def person_iou(gt, masks: list[list[np.ndarray]]) -> float:
    """Instances as one semantic "person" mask: IoU of the union of the kept
    masks against the union of the true ones, pixels summed over the split."""
    inter = union = 0
    for im, ms in zip(gt.images, masks):
        truth = np.asarray(Image.open(im.mask_path)) > 0
        pred = np.any(np.stack(ms), 0) if len(ms) else np.zeros_like(truth)
        inter, union = inter + int((truth & pred).sum()), union + int((truth | pred).sum())
    return inter / max(union, 1)


def _seg_labels(out: Path) -> None:
    """(In the Ultralytics venv.) YOLO segment labels (class, then the
    normalised outline) from the instance-id PNGs: each instance's largest
    outer contour, as Ultralytics' own mask converters take it."""
    import cv2

    for label, mask_path, classes in json.loads((out / "masks.json").read_text()):
        ids = np.asarray(Image.open(mask_path))
        h, w = ids.shape
        lines = []
        for c, u in zip(classes, np.unique(ids[ids > 0])):
            cs, _ = cv2.findContours((ids == u).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            pts = max(cs, key=cv2.contourArea).reshape(-1, 2) / [w, h]
            lines.append(" ".join([str(int(c))] + [f"{v:.6f}" for v in pts.reshape(-1)]))
        Path(label).write_text("\n".join(lines) + "\n")


def _place_font(cfg_dir: Path) -> None:
    """Ultralytics' dataset check wants Arial.ttf in its config folder and
    downloads it when missing; any local TrueType font satisfies it."""
    import matplotlib

    dst = cfg_dir / "Arial.ttf"
    if not dst.exists():
        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        shutil.copy(src, dst)


def peer_train(out: str, run: str, budget_s: str, imgsz: str, model: str, batch: str, seed: str) -> None:
    """(In the Ultralytics venv.) Train from the yaml within budget_s, keep
    Ultralytics' own best (its fitness on val), predict on the test images."""
    import csv

    from ultralytics import YOLO

    _place_font(Path(os.environ["YOLO_CONFIG_DIR"]))
    out, run = Path(out), Path(run)
    seg = "-seg" in model
    if seg:
        _seg_labels(out)
    yolo = YOLO(model)
    t0 = time.time()
    yolo.train(data=str(out / "yolo" / "data.yaml"), imgsz=int(imgsz), time=float(budget_s) / 3600, epochs=1000,
               batch=int(batch), workers=0, device="cpu", seed=int(seed), plots=False, project=str(run.parent),
               name=run.name, exist_ok=True, patience=1000, verbose=False, amp=False)
    train_s = time.time() - t0
    best = run / "weights" / "best.pt"
    rows = list(csv.DictReader(open(run / "results.csv")))
    fit_col = [float(r["metrics/mAP50-95(B)"]) * 0.9 + float(r["metrics/mAP50(B)"]) * 0.1 for r in rows]
    b = max(range(len(rows)), key=fit_col.__getitem__)
    test = json.loads((out / "test.json").read_text())
    best_model = YOLO(str(best))
    preds = []
    for p in test:
        r = best_model.predict(p, imgsz=int(imgsz), conf=0.001, iou=0.7, max_det=300, device="cpu", verbose=False)[0]
        preds.append({"boxes": r.boxes.xyxy.tolist(), "scores": r.boxes.conf.tolist(),
                      "labels": [int(c) for c in r.boxes.cls.tolist()],
                      **({"polygons": [q.tolist() for q in r.masks.xy] if r.masks is not None else []} if seg else {})})
    (run / "result.json").write_text(json.dumps({
        "train_s": round(train_s, 1), "epochs": len(rows), "best_epoch": b + 1,
        "val_map50": round(float(rows[b]["metrics/mAP50(B)"]), 4), "val_map": round(float(rows[b]["metrics/mAP50-95(B)"]), 4),
        "weights": str(best), "preds": preds}))


# --- inference speed ------------------------------------------------------------------

def _letterboxed(paths: list[str], size: int):
    """(N, 3, size, size) floats in [0, 1]: the longer side resized to size,
    padded at the right and bottom (both tools' eval letterbox)."""
    import numpy as np
    from PIL import Image

    out = np.zeros((len(paths), 3, size, size), np.float32)
    for k, p in enumerate(paths):
        im = Image.open(p).convert("RGB")
        s = size / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
        a = np.asarray(im, np.float32).transpose(2, 0, 1) / 255
        out[k, :, : a.shape[1], : a.shape[2]] = a
    return out


def _rate(fn, batch: int, min_s: float = float(os.environ.get("BENCH_MIN_S", 8)), min_reps: int = 5) -> float:
    """Images per second from the median of repeated calls (one warm-up)."""
    import statistics

    fn()
    times, t_end = [], time.time() + min_s
    while len(times) < min_reps or time.time() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(batch / statistics.median(times), 1)


def infer(name: str, seed: int, imgsz: int = 320) -> None:
    """img/s at batch 1 and 8: imgclf's detector in PyTorch eager (network
    + box decoding + NMS, score >= 0.05, its default), imgclf's ONNX export
    when it exists, and the peer's best weights in PyTorch eager and through
    its own ONNX export (conf 0.25, its default)."""
    import torch

    from imgclf.io import torch_load
    from imgclf.tasks.detect.model import detector_from_record

    torch.set_num_threads(1)
    out = WORK / f"{name}-s{seed}"
    test = json.loads((out / "test.json").read_text())
    rec = torch_load(out / "imgclf" / "model.pt")
    model = detector_from_record(rec)
    size = rec["detector"]["image_size"]
    x = torch.from_numpy(_letterboxed(test[:8], size))
    load0 = _load()
    rows = [{"who": "imgclf", "runtime": "PyTorch eager (+ NMS)", "imgsz": size,
             **{f"b{b}": _rate(lambda b=b: model.predict(x[:b]), b) for b in (1, 8)}}]
    rows.append({"who": "imgclf", "runtime": "ONNX Runtime (letterbox and NMS inside)", "imgsz": size,
                 **_imgclf_onnx_rates(out / "imgclf", test[:8])})
    peer = sorted(out.glob(f"peer-*-{imgsz}"))[0]
    subprocess.run([UL_PY, __file__, "peer-infer", str(peer / "weights" / "best.pt"), str(imgsz), str(out / "test.json"),
                    str(peer / "infer.json")], check=True, env=_peer_env(WORK))
    rows += json.loads((peer / "infer.json").read_text())
    _record({"who": "infer", "data": name, "seed": seed, "rows": rows, "load_before": load0, "load_after": _load(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _imgclf_onnx_rates(run: Path, paths: list[str]) -> dict:
    """img/s of `imgclf export RUN` (fp32 ONNX) in ONNX Runtime on one
    thread, from the decoded uint8 image to the kept boxes."""
    from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor

    onnx = run / "bench-model.onnx"
    subprocess.run([sys.executable, "-m", "imgclf", "export", str(run), "--format", "onnx", "--out", str(onnx)],
                   check=True, capture_output=True)
    pred = OnnxDetPredictor(onnx, threads=1)
    x = np.stack([pred.prepare(p)[0] for p in paths])
    return {f"b{b}": _rate(lambda b=b: pred.outputs(x[:b]), b) for b in (1, 8)}


def peer_infer(weights: str, imgsz: str, test_json: str, out_json: str) -> None:
    """(In the Ultralytics venv.) The peer's best weights: PyTorch eager
    (the fused network + its NMS) and its own ONNX export run by ONNX
    Runtime on one thread, batch 1 and 8."""
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    torch.set_num_threads(1)
    size = int(imgsz)
    x = _letterboxed(json.loads(Path(test_json).read_text())[:8], size)
    yolo = YOLO(weights)
    net = yolo.model.fuse().eval()

    def eager(b: int):
        with torch.no_grad():
            return non_max_suppression(net(torch.from_numpy(x[:b])), conf_thres=0.25, iou_thres=0.7, max_det=300)

    rows = [{"who": "ultralytics", "runtime": "PyTorch eager (+ NMS)", "imgsz": size,
             **{f"b{b}": _rate(lambda b=b: eager(b), b) for b in (1, 8)}}]
    for nms in (False, True):
        try:
            f = YOLO(weights).export(format="onnx", imgsz=size, dynamic=True, nms=nms, simplify=True, device="cpu")
        except Exception as e:  # noqa: BLE001 - say which export failed and go on
            rows.append({"who": "ultralytics", "runtime": f"ONNX Runtime ({'NMS inside' if nms else 'no NMS'})",
                         "imgsz": size, "b1": f"export failed: {type(e).__name__}: {e}", "b8": ""})
            continue
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def onnx(b: int, sess=sess, name=name, nms=nms):
            y = sess.run(None, {name: x[:b]})[0]
            return y if nms else non_max_suppression(torch.from_numpy(y), conf_thres=0.25, iou_thres=0.7, max_det=300)

        label = "ONNX Runtime (NMS inside)" if nms else "ONNX Runtime (+ NMS in PyTorch)"
        rows.append({"who": "ultralytics", "runtime": label, "imgsz": size,
                     **{f"b{b}": _rate(lambda b=b, g=onnx: g(b), b) for b in (1, 8)}})
    Path(out_json).write_text(json.dumps(rows))


# --- both, in one run ----------------------------------------------------------------

def run_both(name: str, seed: int, imgsz: int | None, model: str | None, flags: list[str] | None = None) -> None:
    """imgclf's default run, then the peer in imgclf's wall time at imgclf's
    input size (or imgsz)."""
    mine = run_imgclf(name, seed, flags)
    run_peer(name, seed, mine["train_s"], imgsz or mine["image_size"], model or PEER_MODEL[name])


def table() -> None:
    rows = [json.loads(ln) for ln in open(WORK / "results.jsonl")]
    print("| data | seed | who | setting | test mAP@.5 | test mAP@[.5:.95] | mask mAP@.5 / @[.5:.95] "
          "| AP@.5 per class | train s | load avg before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["who"] == "imgclf":
            setting = f"`imgclf train {' '.join(r['flags'])}`".replace(" `", "`") + f", {r['image_size']} px, {r['epochs']} ep"
        elif r["who"] == "ultralytics":
            setting = f"{Path(r['model']).stem} from its yaml, {r['imgsz']} px, {r['epochs']} ep in {r['budget_s']:.0f} s"
        else:
            continue
        per = " / ".join(f"{v:.3f}" for v in r["test"]["ap50_per_class"].values())
        t = r["test"]
        masks = f"{t['mask_map50']:.3f} / {t['mask_map']:.3f}" if "mask_map" in t else "-"
        masks += f", person IoU {t['person_iou']:.3f}" if "person_iou" in t else ""
        print(f"| {r['data']} | {r['seed']} | {r['who']} | {setting} | {t['map50']:.3f} | {t['map']:.3f} | {masks} "
              f"| {per} | {r['train_s']:.0f} | {r['load_before']} |")
    for r in rows:
        if r["who"] == "infer":
            print(f"\ninference, {r['data']} seed {r['seed']} (load {r['load_before']}):")
            for x in r["rows"]:
                print(f"| {x['who']} | {x['runtime']} | {x['imgsz']} | {x['b1']} | {x['b8']} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["run", "imgclf", "peer", "infer", "table", "peer-train", "peer-infer"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--imgsz", type=int, help="the peer's input size (default: imgclf's)")
    ap.add_argument("--model", help="the peer's model yaml (default: yolo11n.yaml, yolo11n-seg.yaml for masks)")
    ap.add_argument("--budget", type=float, help="peer: seconds of training")
    ap.add_argument("--tag", default="", help="imgclf: a suffix for the run folder")
    a, flags = ap.parse_known_args()  # anything else goes to `imgclf train`
    if a.cmd == "peer-train":
        return peer_train(*a.args)
    if a.cmd == "peer-infer":
        return peer_infer(*a.args)
    if a.cmd == "table":
        return table()
    name, seed = a.args[0], int(a.args[1])
    if a.cmd == "run":
        run_both(name, seed, a.imgsz, a.model, flags)
    elif a.cmd == "imgclf":
        run_imgclf(name, seed, flags, a.tag)
    elif a.cmd == "peer":
        run_peer(name, seed, a.budget, a.imgsz or 320, a.model or PEER_MODEL[name])
    elif a.cmd == "infer":
        infer(name, seed, a.imgsz or 320)


if __name__ == "__main__":
    main()
