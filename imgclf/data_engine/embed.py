"""Embeddings: one vector per image, from a run's own backbone or a pretrained one.

The embedding is the backbone's pooled feature vector, the very numbers the
head is trained on, so it comes from (and goes to) the feature cache: after
`imgclf train`, embedding the run's data costs a hash per file. With a run,
its own backbone is used (fine-tuned ones included: the cache key holds the
weights' hash, so fine-tuned and pretrained features never mix).

    embedder = load_embedder(run="runs/photos")           # or model="efficientnet_lite0" (models/embedder.py)
    emb = embed_splits(embedder, RunDir(run).splits())    # Embeddings: paths, labels, splits, vectors
    emb = embed_files(embedder, ["a.jpg", "b.png"])

`imgclf embed` writes them (Parquet, or .npy plus a CSV index); `similar`,
`suggest` and near-duplicate checks read them through these functions.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data.datasets import discover
from imgclf.data.loading import BadFileLog
from imgclf.errors import ConfigError, DataError, MissingExtra
from imgclf.inference.neighbours import unit_rows
from imgclf.inference.predictor import expand_paths
from imgclf.inference.torch_predictor import TorchPredictor
from imgclf.io import atomic_write_bytes, atomic_write_text
from imgclf.models.embedder import BackboneEmbedder
from imgclf.runs import RunDir

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Embeddings:
    paths: list[str]  # absolute paths
    vectors: np.ndarray  # (N, D) float32 pooled backbone features, not normalised
    labels: list[str | None]  # class name where known
    splits: list[str | None]  # train | val | test where known
    model: str  # architecture
    source: str  # the run directory, or "pretrained"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files and why

    def unit(self) -> np.ndarray:
        """L2-normalised rows: dot products are cosine similarities."""
        return unit_rows(self.vectors)


def load_embedder(run: str | None = None, model: str | None = None, device: str = "auto", engine: str = "auto",
                  cache_dir: str | Path | None = None) -> BackboneEmbedder:
    """The embedding service (models/embedder.py) of a run's own backbone, or
    of a pretrained model's (default efficientnet_lite0)."""
    if run and model:
        raise ConfigError("--run and --model both given", "--run RUN uses the run's own backbone; drop --model")
    if run:
        return TorchPredictor.from_run(run, device=device, engine=engine, cache_dir=cache_dir).embedder
    return BackboneEmbedder.pretrained(model or "efficientnet_lite0", device, engine, cache_dir)


def _bad_log():
    return BadFileLog()


def embed_splits(embedder, splits, names: tuple[str, ...] = SPLIT_NAMES, batch_size: int = 32, workers: int = 1,
                 progress: bool = True, use_cache: bool = True) -> Embeddings:
    """Every image of the named splits, with its label and split (unreadable ones skipped and listed)."""
    items = [(rel, y, name) for name in names for rel, y in getattr(splits, name)]
    bad = _bad_log()
    feats, _, kept = embedder.features_items(splits.root, [(r, y) for r, y, _ in items], batch_size, workers,
                                             bad, ("plain",), progress, use_cache)
    rows = [items[int(i)] for i in kept]
    return Embeddings([str(splits.path(r)) for r, _, _ in rows], _vectors(feats), [splits.classes[y] for _, y, _ in rows],
                      [s for _, _, s in rows], embedder.arch, embedder.source, list(bad.seen.items()))


def embed_files(embedder, paths: list[str], known=None, batch_size: int = 32, workers: int = 1,
                progress: bool = True, use_cache: bool = True) -> Embeddings:
    """Image files as given; label and split filled in for files of `known` (a Splits, e.g. the run's)."""
    lookup = {}
    if known is not None:
        lookup = {str(known.path(r).resolve()): (known.classes[y], name)
                  for name in SPLIT_NAMES for r, y in getattr(known, name)}
    abs_paths = [str(Path(p).resolve()) for p in paths]
    bad = _bad_log()
    feats, _, kept = embedder.features_items("", [(p, -1) for p in abs_paths], batch_size, workers,
                                             bad, ("plain",), progress, use_cache)
    rows = [abs_paths[int(i)] for i in kept]
    return Embeddings(rows, _vectors(feats), [lookup.get(p, (None, None))[0] for p in rows],
                      [lookup.get(p, (None, None))[1] for p in rows], embedder.arch, embedder.source,
                      list(bad.seen.items()))


def _vectors(feats: dict) -> np.ndarray:
    f = feats["plain"]
    return np.asarray(f, np.float32) if f.size else np.zeros((0, 0), np.float32)


def embed_command(cfg) -> Embeddings:
    """`imgclf embed`: what to embed, from the inputs given.

    no inputs, --run RUN     the run's train/val/test images (its own split)
    one folder or CSV        a labelled dataset as `train` reads it (the run's split if it is the run's data)
    files and folders        each image file; label and split filled in where the run knows them"""
    if not cfg.out:
        raise ConfigError("--out is missing", "imgclf embed DATA --out embeddings.parquet (or .npy)")
    out_format(cfg.out)
    embedder = load_embedder(cfg.run, cfg.model, cfg.device, cfg.engine, cfg.cache_dir)
    run_splits = RunDir(cfg.run).splits() if cfg.run else None
    kw = {"batch_size": cfg.batch_size, "workers": cfg.workers, "use_cache": cfg.cache}
    if not cfg.inputs:
        if run_splits is None:
            raise ConfigError("nothing to embed", "give a dataset or image files (imgclf embed DATA --out FILE), "
                                                  "or --run RUN to embed the run's own images")
        return embed_splits(embedder, run_splits, **kw)
    one = Path(cfg.inputs[0])
    if cfg.labels and len(cfg.inputs) == 1 and (one.is_dir() or one.suffix.lower() == ".csv"):
        try:
            splits = discover(one, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        except DataError:
            if one.suffix.lower() == ".csv":
                raise
            splits = None  # a folder of images with no class folders: plain files
        if splits is not None:
            if run_splits is not None and Path(run_splits.root).resolve() == Path(splits.root).resolve():
                splits = run_splits  # the run's own split, not a fresh one
            return embed_splits(embedder, splits, **kw)
    return embed_files(embedder, expand_paths(cfg.inputs), run_splits, **kw)


def out_format(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in (".parquet", ".npy"):
        raise ConfigError(f"--out {out}: unknown format {suffix or '(no extension)'}",
                          "name it FILE.parquet (one table) or FILE.npy (vectors, plus FILE.csv: path,label,split)")
    return suffix[1:]


def write_embeddings(emb: Embeddings, out: str | Path) -> list[Path]:
    """FILE.parquet (columns path, label, split, embedding) or FILE.npy (N, D)
    plus FILE.csv (row, path, label, split); atomic. Returns the files written."""
    out = Path(out)
    meta = {"model": emb.model, "source": emb.source, "dim": int(emb.vectors.shape[1]) if len(emb.vectors) else 0,
            "what": "pooled backbone features, not normalised (cosine: normalise rows first)"}
    if out_format(str(out)) == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingExtra("writing Parquet needs pyarrow", "pip install pyarrow, or write --out FILE.npy") from None
        d = int(emb.vectors.shape[1]) if len(emb.vectors) else 0
        vec = pa.FixedSizeListArray.from_arrays(pa.array(emb.vectors.reshape(-1), pa.float32()), d)
        table = pa.table({"path": emb.paths, "label": pa.array(emb.labels, pa.string()),
                          "split": pa.array(emb.splits, pa.string()), "embedding": vec},
                         metadata={"imgclf": json.dumps(meta)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(out, buf.getvalue())
        return [out]
    buf = io.BytesIO()
    np.save(buf, emb.vectors.astype(np.float32))
    atomic_write_bytes(out, buf.getvalue())
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["row", "path", "label", "split"])
    w.writerows([i, p, lab or "", s or ""] for i, (p, lab, s) in enumerate(zip(emb.paths, emb.labels, emb.splits)))
    index = out.with_suffix(".csv")
    atomic_write_text(index, text.getvalue())
    return [out, index]


def read_embeddings(path: str | Path) -> Embeddings:
    """What write_embeddings wrote (either format)."""
    path = Path(path)
    if out_format(str(path)) == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        meta = json.loads(t.schema.metadata[b"imgclf"])
        col = t.column("embedding").combine_chunks()
        vecs = col.values.to_numpy().reshape(len(t), -1) if len(t) else np.zeros((0, 0), np.float32)
        return Embeddings(t.column("path").to_pylist(), vecs.astype(np.float32), t.column("label").to_pylist(),
                          t.column("split").to_pylist(), meta["model"], meta["source"])
    vecs = np.load(path, allow_pickle=False)
    with open(path.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return Embeddings([r["path"] for r in rows], vecs, [r["label"] or None for r in rows],
                      [r["split"] or None for r in rows], "", "")
