"""Near-duplicate detection: recall and precision of the candidate detectors
on real photos with modified copies made here, and the cost of comparing
every pair at 10k and 100k images.

Two sets of photos that share no photo:
  * selection: hymenoptera + cats_and_dogs_filtered/validation (Kaggle ids 2000-2499):
    thresholds are chosen here;
  * report: dogs_vs_cats_2k_fullres (Kaggle ids 0-999): the figures are measured here,
    with the thresholds chosen on the other set.
Each set: K originals, each with 6 modified copies (MODIFICATIONS), mixed with
M unrelated photos. A "copy pair" is two images of the same original (21
per original: the copies among themselves too). Reported pairs are the pairs
inside the reported groups (what `imgclf check` lists), so one false link
between two groups counts every pair it joins.

    python bench/bench_neardup.py                 # about 5 minutes on 2 cores (embeddings of ~2,800 images)
    python bench/bench_neardup.py --originals 40 --distractors 100   # a quick look
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATASETS, machine, table  # noqa: E402


def _jpeg(im, path: Path, quality: int = 90) -> None:
    im.convert("RGB").save(path, format="JPEG", quality=quality)


def _crop(im, seed: int):
    """Keep 90% of the width and of the height, at a random offset."""
    w, h = im.size
    cw, ch = int(round(w * 0.9)), int(round(h * 0.9))
    r = random.Random(seed)
    x, y = r.randint(0, w - cw), r.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


def _modifications():
    from PIL import Image, ImageEnhance, ImageOps

    return {
        "jpeg30": lambda im, s: (im, 30),
        "half": lambda im, s: (im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.LANCZOS), 90),
        "crop10": lambda im, s: (_crop(im, s), 90),
        "bright+20": lambda im, s: (ImageEnhance.Brightness(im).enhance(1.2), 90),
        "bright-20": lambda im, s: (ImageEnhance.Brightness(im).enhance(0.8), 90),
        "mirror": lambda im, s: (ImageOps.mirror(im), 90),
    }


MODIFICATIONS = ("jpeg30", "half", "crop10", "bright+20", "bright-20", "mirror")


def write_copies(src: Path, dst: Path, stem: str, seed: int) -> list[Path]:
    """The original (bytes as given) and its 6 modified copies, as JPEGs in dst."""
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    out = [dst / f"{stem}{src.suffix.lower()}"]
    out[0].write_bytes(src.read_bytes())
    with Image.open(src) as raw:
        im = raw.convert("RGB")
    for name, fn in _modifications().items():
        mod, q = fn(im, seed)
        p = dst / f"{stem}_{name}.jpg"
        _jpeg(mod, p, q)
        out.append(p)
    return out


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def build_set(sources: list[Path], dst: Path, originals: int, distractors: int, seed: int
              ) -> tuple[list[Path], np.ndarray]:
    """Files and their photo id: the same id for an original and its copies,
    a fresh one for each unrelated photo."""
    pool = list(sources)
    random.Random(seed).shuffle(pool)
    files, gid = [], []
    for k, src in enumerate(pool[:originals]):
        for f in write_copies(src, dst / "copies", f"o{k:04d}_{src.stem}", seed + k):
            files.append(f)
            gid.append(k)
    for k, src in enumerate(pool[originals:originals + distractors]):
        f = dst / "other" / f"d{k:04d}_{src.name}"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(src.read_bytes())
        files.append(f)
        gid.append(originals + k)
    return files, np.array(gid)


# ------------------------------------------------------------------ detectors

def hashes_of(files: list[Path]) -> tuple[dict[str, np.ndarray], float]:
    """uint64[N, 2] (image, mirror) per hash function, from the same 64 px
    thumbnail `imgclf check` decodes; and seconds per image for pHash."""
    import imagehash
    from PIL import ImageOps

    from imgclf.data.images import open_image
    from imgclf.data.near_dup import image_hash

    fns = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash,
           "ahash": imagehash.average_hash}
    out = {k: np.zeros((len(files), 2), np.uint64) for k in fns}
    t_ph = 0.0
    for n, f in enumerate(files):
        t0 = time.perf_counter()
        img = open_image(f, draft_size=64)
        img.thumbnail((64, 64))
        out["phash"][n] = image_hash(img)
        t_ph += time.perf_counter() - t0
        for k, fn in fns.items():
            if k != "phash":
                for v, im in enumerate((img, ImageOps.mirror(img))):
                    out[k][n, v] = np.packbits(fn(im).hash.flatten()).view(">u8")[0]
    return out, t_ph / len(files)


def hash_distance(h: np.ndarray) -> np.ndarray:
    d = np.minimum(np.bitwise_count(h[:, 0, None] ^ h[None, :, 0]), np.bitwise_count(h[:, 1, None] ^ h[None, :, 0]))
    return np.minimum(d, d.T)  # symmetric: the smaller of the two mirror comparisons


def cosine(plain: np.ndarray, flip: np.ndarray) -> np.ndarray:
    from imgclf.inference.neighbours import unit_rows as _unit

    p, f = _unit(plain), _unit(flip)
    s = np.maximum(p @ p.T, f @ p.T)
    return np.maximum(s, s.T)


# ------------------------------------------------------------------ scoring

def score(linked: np.ndarray, gid: np.ndarray) -> dict:
    """Pair recall and precision of the groups formed from the linked pairs
    (boolean N x N, upper triangle used), and of the direct links alone."""
    from imgclf.data.near_dup import groups

    n = len(gid)
    iu = np.triu_indices(n, 1)
    truth = gid[iu[0]] == gid[iu[1]]
    direct = linked[iu]
    i, j = iu[0][direct], iu[1][direct]
    comp = np.arange(n)
    for k, g in enumerate(groups(n, i, j)):
        comp[g] = n + k
    grouped = comp[iu[0]] == comp[iu[1]]
    out = {}
    for name, rep in (("pairs", direct), ("groups", grouped)):
        tp, fp = int((rep & truth).sum()), int((rep & ~truth).sum())
        out[name] = {"recall": tp / max(1, truth.sum()), "false": fp / max(1, tp + fp), "tp": tp, "fp": fp,
                     "reported": tp + fp}
    out["true_pairs"] = int(truth.sum())
    return out


def kind_of(f: Path) -> str:
    """original | one of MODIFICATIONS | other (an unrelated photo), from the name build_set gave it."""
    if f.parent.name == "other":
        return "other"
    return next((m for m in MODIFICATIONS if f.stem.endswith("_" + m)), "original")


def recall_by_modification(linked: np.ndarray, gid: np.ndarray, files: list[Path]) -> dict:
    """Share of originals linked directly to their copy, per modification."""
    out = {}
    kinds = [kind_of(f) for f in files]
    orig = {g: k for k, (g, kd) in enumerate(zip(gid, kinds)) if kd == "original"}
    for m in MODIFICATIONS:
        hits = [linked[orig[g], k] for k, (g, kd) in enumerate(zip(gid, kinds)) if kd == m]
        out[m] = float(np.mean(hits)) if hits else float("nan")
    return out


def exact_links(files: list[Path]) -> np.ndarray:
    from imgclf.data.loading import file_hash

    h = np.array([file_hash(f) for f in files])
    return h[:, None] == h[None, :]


def candidates(h: dict[str, np.ndarray], emb: tuple[np.ndarray, np.ndarray] | None) -> dict[str, tuple]:
    """name -> (similarity matrix, thresholds, 'le' | 'ge')."""
    c = {k: (hash_distance(v), list(range(0, 25)), "le") for k, v in h.items()}
    if emb is not None:
        c["embed"] = (cosine(*emb), [round(x, 3) for x in np.arange(0.70, 0.995, 0.01)], "ge")
    return c


def linked_at(sim: np.ndarray, t, op: str) -> np.ndarray:
    return sim <= t if op == "le" else sim >= t


def choose(sim, thresholds, op, gid, max_false: float) -> tuple[object, dict, list]:
    """On this (the selection) set: among thresholds whose reported pairs are
    at most `max_false` false, the strictest whose grouped recall is within
    0.5 points of the best (fewer false links where recall is all but equal).
    Also returns the sweep."""
    sweep = [(t, score(linked_at(sim, t, op), gid)) for t in thresholds]
    ok = [(t, s) for t, s in sweep if s["groups"]["false"] <= max_false] or sweep[:1]
    best = max(s["groups"]["recall"] for _, s in ok)
    near = [(t, s) for t, s in ok if s["groups"]["recall"] >= best - 0.005]
    t, s = (min if op == "le" else max)(near, key=lambda ts: ts[0])
    return t, s, sweep


# ------------------------------------------------------------------ cost at scale

def cost_at_scale(sizes: list[int], dim: int) -> list[dict]:
    """Seconds to compare every pair: hashes at each size, embeddings up to
    20k (measured) and beyond (n^2, extrapolated from 20k: said so)."""
    from imgclf.data.near_dup import hash_pairs
    from imgclf.data_engine.near_dup import EMBED_MIN_COSINE
    from imgclf.inference.neighbours import similar_pairs

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        h = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64)
        t0 = time.perf_counter()
        hash_pairs(h)
        th = time.perf_counter() - t0
        if n <= 20_000:
            f = rng.standard_normal((n, dim)).astype(np.float32)
            t0 = time.perf_counter()
            similar_pairs(f, f[:, ::-1].copy(), EMBED_MIN_COSINE)
            te, how = time.perf_counter() - t0, "measured"
            rows.append({"images": f"{n:,}", "pHash pairs s": f"{th:.1f}", "embedding pairs s": f"{te:.1f}",
                         "embedding": how})
            last = (n, te)
        else:
            te = last[1] * (n / last[0]) ** 2
            rows.append({"images": f"{n:,}", "pHash pairs s": f"{th:.1f}", "embedding pairs s": f"{te:.0f}",
                         "embedding": f"extrapolated from {last[0]:,} (n^2)"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=120, help="photos given modified copies, per set")
    ap.add_argument("--distractors", type=int, default=400, help="unrelated photos, per set")
    ap.add_argument("--max-false", type=float, default=0.005, help="selection: most false share of reported pairs")
    ap.add_argument("--no-embed", action="store_true", help="hashes only (no backbone)")
    ap.add_argument("--scale", default="10000,20000,100000", help="sizes for the pair-comparison cost")
    ap.add_argument("--work", default=None, help="folder for the generated sets (default: a temporary one)")
    a = ap.parse_args()
    from imgclf.data_engine.near_dup import embeddings

    print(f"machine: {machine()} (shared with other jobs)\n")
    sel_src = photos(DATASETS / "hymenoptera") + photos(DATASETS / "cats_and_dogs_filtered" / "validation")
    rep_src = photos(DATASETS / "dogs_vs_cats_2k_fullres")
    work = Path(a.work or tempfile.mkdtemp(prefix="neardup-"))
    sets = {}
    for name, src, seed in (("selection", sel_src, 1), ("report", rep_src, 2)):
        files, gid = build_set(src, work / name, a.originals, a.distractors, seed)
        h, t_hash = hashes_of(files)
        emb, t_emb = None, None
        if not a.no_embed:
            t0 = time.perf_counter()
            feats, kept = embeddings(work / name, [(str(f.relative_to(work / name)), 0) for f in files], progress=False)
            t_emb = (time.perf_counter() - t0) / len(files)
            assert len(kept) == len(files), "an image could not be read"
            emb = (feats["plain"], feats["flip"])
        sets[name] = (files, gid, candidates(h, emb), t_hash, t_emb)
        print(f"{name}: {len(files)} images, {len(set(gid.tolist()))} photos, {a.originals} with 6 copies; "
              f"pHash {1000 * t_hash:.1f} ms/image, embeddings {'-' if t_emb is None else f'{1000 * t_emb:.0f} ms/image'}"
              f" (plain + mirrored, cache {'cold' if t_emb and t_emb > 0.01 else 'warm'})")
    report_tables(sets, a)
    print("\ncost of comparing every pair (random hashes / 1280-d features; excludes hashing and the backbone):\n")
    print(table(cost_at_scale([int(s) for s in a.scale.split(",")], 1280),
                ["images", "pHash pairs s", "embedding pairs s", "embedding"]))


def report_tables(sets: dict, a) -> None:
    files_s, gid_s, cand_s, _, _ = sets["selection"]
    files_r, gid_r, cand_r, _, _ = sets["report"]
    rows, chosen, sweeps = [], {}, {}
    s = score(exact_links(files_r), gid_r)  # the baseline: what `check` found before, identical files
    rows.append({"detector": "exact (file hash; the baseline)", "threshold": "identical bytes", "recall (sel.)": "-",
                 "recall": f"{100 * s['groups']['recall']:.1f}%", "false": f"{100 * s['groups']['false']:.2f}%",
                 "false pairs": f"{s['groups']['fp']} of {s['groups']['reported']}",
                 "direct recall": f"{100 * s['pairs']['recall']:.1f}%", "direct false": f"{100 * s['pairs']['false']:.2f}%"})
    for name, (sim, ths, op) in cand_s.items():
        t, s_sel, sweep = choose(sim, ths, op, gid_s, a.max_false)
        chosen[name] = (t, op)
        sweeps[name] = sweep
        sim_r = cand_r[name][0]
        s = score(linked_at(sim_r, t, op), gid_r)
        rows.append({"detector": name, "threshold": f"{'<=' if op == 'le' else '>='} {t}",
                     "recall (sel.)": f"{100 * s_sel['groups']['recall']:.1f}%",
                     "recall": f"{100 * s['groups']['recall']:.1f}%", "false": f"{100 * s['groups']['false']:.2f}%",
                     "false pairs": f"{s['groups']['fp']} of {s['groups']['reported']}",
                     "direct recall": f"{100 * s['pairs']['recall']:.1f}%",
                     "direct false": f"{100 * s['pairs']['false']:.2f}%"})
    if "embed" in cand_s:  # either detector links a pair; "phash or embed" is `check --near-dup embed`
        for hname in ("phash", "dhash"):
            th, te = chosen[hname][0], chosen["embed"][0]
            both = lambda c: (c[hname][0] <= th) | (c["embed"][0] >= te)  # noqa: E731
            s_sel, s = score(both(cand_s), gid_s), score(both(cand_r), gid_r)
            rows.append({"detector": f"{hname} or embed", "threshold": f"<= {th} or >= {te}",
                         "recall (sel.)": f"{100 * s_sel['groups']['recall']:.1f}%",
                         "recall": f"{100 * s['groups']['recall']:.1f}%", "false": f"{100 * s['groups']['false']:.2f}%",
                         "false pairs": f"{s['groups']['fp']} of {s['groups']['reported']}",
                         "direct recall": f"{100 * s['pairs']['recall']:.1f}%",
                         "direct false": f"{100 * s['pairs']['false']:.2f}%"})
    print(f"\nthresholds chosen on the selection set (the strictest within 0.5 points of the best grouped recall "
          f"with <= {100 * a.max_false:.1f}% false), "
          f"measured on the report set ({gid_r.max() + 1} photos, {len(files_r)} images, "
          f"{score(np.zeros((len(gid_r),) * 2, bool), gid_r)['true_pairs']} copy pairs):\n")
    print(table(rows, list(rows[0])))
    for name in ("phash", "embed"):
        if name not in sweeps:
            continue
        print(f"\nselection set, {name}: the sweep the threshold was chosen from\n")
        srows = [{"threshold": t, "recall": f"{100 * s['groups']['recall']:.1f}%",
                  "false": f"{100 * s['groups']['false']:.2f}%", "false pairs": s["groups"]["fp"]}
                 for t, s in sweeps[name] if s["groups"]["recall"] > 0.5 and s["groups"]["false"] < 0.2]
        print(table(srows, ["threshold", "recall", "false", "false pairs"]))
    mrows = []
    for name, (t, op) in chosen.items():
        r = recall_by_modification(linked_at(cand_r[name][0], t, op), gid_r, files_r)
        mrows.append({"detector": name, **{m: f"{100 * v:.0f}%" for m, v in r.items()}})
    print("\nreport set: share of originals linked directly to each kind of copy:\n")
    print(table(mrows, list(mrows[0])))
    print("\nfalse links on the report set (inspect: the source data may hold real near-duplicates):")
    for name, (t, op) in chosen.items():
        sim = cand_r[name][0]
        link = np.triu(linked_at(sim, t, op), 1) & (gid_r[:, None] != gid_r[None, :])
        for i, j in zip(*np.nonzero(link)):
            print(f"  {name}: {files_r[i].name} ~ {files_r[j].name} ({sim[i, j]:.3f})")


if __name__ == "__main__":
    main()
