"""The data engine on real images: `imgclf embed`, `similar` (CLI, /v1/similar,
the page), `suggest`, and `train --from` re-encoding only new files. Most
tests reuse the session's cats_dogs_tiny run, whose features are cached."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import DATASETS, imgclf, need
from .test_export import val_images


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (the first call of each command runs as a subprocess, the rest here: cheaper)."""
    from imgclf.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_embed_run_dataset_and_files(tiny_run, tiny, tmp_path, capsys):
    import pyarrow.parquet as pq

    from imgclf.data_engine.embed import read_embeddings

    run, _ = tiny_run
    p = imgclf("embed", "--run", run, "--out", tmp_path / "all.parquet")  # no inputs: the run's own images
    assert "300 embeddings of 1280 dimensions" in p.stdout
    t = pq.read_table(tmp_path / "all.parquet")
    assert t.column_names == ["path", "label", "split", "embedding"] and len(t) == 300
    assert sorted(set(t.column("split").to_pylist())) == ["train", "val"]
    emb = read_embeddings(tmp_path / "all.parquet")
    # What a user wants from an embedding: a validation image's nearest training image shares its label.
    U = emb.unit()
    tr = np.array([s == "train" for s in emb.splits])
    nn = (U[~tr] @ U[tr].T).argmax(1)
    agree = np.mean(np.array(emb.labels)[~tr] == np.array(emb.labels)[tr][nn])
    assert agree >= 0.85, agree

    cat, dog = val_images(tiny, 1)["cats"][0], val_images(tiny, 1)["dogs"][0]
    (tmp_path / "notes.txt").write_text("not an image")
    rc, out, err = cli(capsys, "embed", cat, dog, tmp_path / "notes.txt", "--run", run, "--out", tmp_path / "some.npy")
    assert rc == 0 and "2 embeddings" in out and "1 unreadable" in out and "notes.txt" in err
    vecs = np.load(tmp_path / "some.npy")
    rows = list(csv.DictReader(open(tmp_path / "some.csv")))
    assert vecs.shape == (2, 1280)
    assert [(r["label"], r["split"]) for r in rows] == [("cats", "val"), ("dogs", "val")]  # known to the run
    same = {Path(q).name: v for q, v in zip(emb.paths, emb.vectors)}
    assert np.allclose(vecs[0], same[cat.name], atol=1e-5)  # one cache, one answer

    rc, _, err = cli(capsys, "embed", tiny, "--out", tmp_path / "x.csv")
    assert rc == 2 and "FILE.parquet" in err


def test_similar_cli_finds_itself_and_neighbours(tiny_run, tiny, capsys):
    from imgclf.runs import RunDir

    run, _ = tiny_run
    splits = RunDir(run).splits()
    rel = next(r for r, y in splits.train if splits.classes[y] == "dogs")
    dog_val = val_images(tiny, 2)["dogs"][1]
    p = imgclf("similar", run, splits.path(rel), dog_val, "-k", "5", "--format", "json")
    res = json.loads(p.stdout)
    own, other = res[0]["neighbours"], res[1]["neighbours"]
    assert own[0]["path"] == rel and own[0]["similarity"] > 0.999  # a training image finds itself first
    assert len(other) == 5 and [n["similarity"] for n in other] == sorted((n["similarity"] for n in other), reverse=True)
    assert sum(n["label"] == "dogs" for n in other) >= 4
    assert RunDir(run).similar_file.exists()
    rc, out, err = cli(capsys, "similar", run, dog_val, "-k", "3")  # a table; the saved index is reused
    assert rc == 0 and "building" not in err and out.count("dogs") >= 2 and "cats_dogs_tiny" in out


@pytest.fixture(scope="module")
def run_client(tiny_run):
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(str(tiny_run[0]), max_files=4, max_pixels=400_000))) as c:
        yield c


def test_similar_served_with_thumbnails(run_client, tiny_run, tiny):
    from imgclf.runs import RunDir

    splits = RunDir(tiny_run[0]).splits()
    rel = splits.train[0][0]
    info = run_client.get("/v1/model").json()["similar"]
    assert info == {"available": True, "images": len(splits.train)}
    assert "k" in str(run_client.get("/openapi.json").json()["paths"]["/v1/similar"]["post"]["parameters"])
    r = run_client.post("/v1/similar?k=3", files=[("file", ("q.jpg", splits.path(rel).read_bytes()))])
    assert r.status_code == 200, r.text
    nbs = r.json()["results"][0]["neighbours"]
    assert len(nbs) == 3 and nbs[0]["path"] == rel and nbs[0]["similarity"] > 0.999
    thumb = Image.open(io.BytesIO(base64.b64decode(nbs[0]["thumbnail"].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 96
    cat = base64.b64encode(val_images(tiny, 1)["cats"][0].read_bytes()).decode()
    r = run_client.post("/v1/similar", json={"images": [cat]})
    assert r.status_code == 200 and len(r.json()["results"][0]["neighbours"]) == 10
    for query, code in (("k=0", "bad_k"), ("k=x", "bad_k"), ("top_k=3", "bad_parameters")):
        r = run_client.post(f"/v1/similar?{query}", json={"images": [cat]})
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    r = run_client.post("/v1/similar", files=[("file", ("x.jpg", b"not an image at all"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_image"
    big = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(big, "PNG")  # over this server's --max-pixels: the same budgets as predict
    r = run_client.post("/v1/similar", files=[("file", ("big.png", big.getvalue()))])
    assert r.status_code == 413


def test_similar_unavailable_for_onnx(tiny_run, tmp_path_factory):
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    from .test_export import export_once

    model = export_once(tiny_run, tmp_path_factory)[0]
    with TestClient(create_app(ServeConfig(str(model)))) as c:
        assert c.get("/v1/model").json()["similar"]["available"] is False
        r = c.post("/v1/similar", json={"images": ["aGVsbG8="]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "similar_unavailable"
        assert "serve the run directory" in r.json()["error"]["message"]
        assert "/v1/similar" not in c.get("/openapi.json").json()["paths"]  # not offered, so not in the schema


def test_page_shows_similar_training_images(tiny_run, tiny, tmp_path):
    from .browser import browser_page, chromium_path
    from .servers import running_server

    chromium_path()
    with running_server(tiny_run[0], tmp_path / "server.log") as (url, _), browser_page() as page:
        page.goto(url + "/")
        page.locator("#model-info", has_text="2 classes").wait_for()  # the page's CSP refuses string predicates
        page.set_input_files("#file", [str(val_images(tiny, 1)["dogs"][0])])
        figs = page.locator("#results .card .similar figure")
        figs.nth(5).wait_for(timeout=30_000)
        labels = figs.evaluate_all("els => els.map(e => e.dataset.label)")
        assert len(labels) == 6 and labels.count("dogs") >= 4
        assert page.locator("#results .card .similar img").first.evaluate("i => i.naturalWidth") > 0


def test_suggest_ranks_new_class_and_uncertain_first(tiny_run, tiny, tmp_path):
    run, _ = tiny_run
    pool = tmp_path / "unlabeled"
    pool.mkdir()
    for paths in val_images(tiny, 8).values():
        for p in paths:
            shutil.copy(p, pool / p.name)
    insects = [p for c in ("ants", "bees") for p in sorted((need(DATASETS / "hymenoptera") / "val" / c).iterdir())[:2]]
    for p in insects:
        shutil.copy(p, pool / p.name)
    (pool / "readme.txt").write_text("not an image")
    out = tmp_path / "to_label.csv"
    p = imgclf("suggest", run, pool, "-n", "6", "--out", out)
    assert "readme.txt" in p.stderr and "6 images to label next" in p.stdout
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[:2] == ["path", "label"] and all(r["label"] == "" for r in rows)  # ready to fill in
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6] and len({r["path"] for r in rows}) == 6
    # The four images of classes the model has never seen come first.
    assert {Path(r["path"]).name for r in rows[:4]} == {p.name for p in insects}
    assert all(r["why"].startswith("possibly a new class") for r in rows[:4])


def test_rank_for_labelling_skips_near_copies():
    from imgclf.data_engine.suggest import rank_for_labelling
    from imgclf.inference.neighbours import unit_rows

    rng = np.random.default_rng(0)
    labelled = unit_rows(rng.standard_normal((50, 32)))
    pool = unit_rows(rng.standard_normal((20, 32)))
    pool[1] = pool[0] + 1e-4  # a near copy of the most uncertain image
    probs = np.tile([0.9, 0.1], (20, 1))
    probs[0] = probs[1] = [0.5, 0.5]
    order, _ = rank_for_labelling(probs, unit_rows(pool), labelled, 3, novelty=np.zeros(20))
    assert order[0] in (0, 1) and not {0, 1} <= set(order)


def test_train_from_adds_a_class_encoding_only_its_images(tiny, tmp_path, cache_dir, capsys):
    """A run on cats and dogs; then ants are added and `train --from` encodes
    exactly the ants' images: every cat and dog comes from the cache."""
    from imgclf.models.features import cache_info
    from imgclf.runs import RunDir

    data = tmp_path / "data"
    for split, n in (("train", 12), ("val", 6)):
        for c in ("cats", "dogs"):
            (data / split / c).mkdir(parents=True)
            for p in sorted((tiny / split / c).iterdir())[:n]:
                shutil.copy(p, data / split / c / p.name)
    cache = tmp_path / "cache"
    if (cache_dir / "onnx").exists():
        shutil.copytree(cache_dir / "onnx", cache / "onnx")  # the exported backbone: not what is measured
    imgclf("train", data, "--out", tmp_path / "a", "--cache-dir", cache, "--patience", "30", "--flip-features")

    def entries() -> dict[str, int]:
        return {r["variant"]: r["entries"] for r in cache_info(cache)}

    before = entries()
    assert before == {"plain": 36, "flip": 24}
    hym = need(DATASETS / "hymenoptera")
    for split, n in (("train", 10), ("val", 4)):
        (data / split / "ants").mkdir()
        for p in [p for p in sorted((hym / split / "ants").iterdir()) if p.suffix.lower() == ".jpg"][:n]:
            shutil.copy(p, data / split / "ants" / p.name)
    rc, out, _ = cli(capsys, "train", data, "--from", tmp_path / "a", "--out", tmp_path / "b")
    assert rc == 0 and "(none given here)" in out  # its settings, --cache-dir and --patience included, came from a
    assert "24/34 train images from cache; 14 images encoded" in out  # 10 train + 4 val ants, nothing else
    assert entries() == {"plain": 50, "flip": 34}
    rec = RunDir(tmp_path / "b").record()
    assert rec["classes"] == ["ants", "cats", "dogs"] and rec["config"]["patience"] == 30
    assert json.loads((tmp_path / "b" / "eval_val.json").read_text())["accuracy"] >= 0.8


def test_hnsw_index_agrees_with_brute_force_and_onnxruntime_still_loads(tiny_run, tmp_path):
    """From HNSW_MIN images on, the index searches a saved usearch graph
    (memory-mapped on later loads): the same neighbours as numpy on real
    embeddings, in a fresh process where onnxruntime is imported afterwards
    (the order that crashes when usearch is imported first)."""
    import subprocess
    import sys

    from .conftest import ROOT

    code = f"""
import numpy as np
from pathlib import Path
from types import SimpleNamespace
from imgclf.data_engine import similar
from imgclf.inference import neighbours
from imgclf.runs import RunDir
run = RunDir({str(tiny_run[0])!r})
X = (similar.SimilarityIndex.load(run.similar_file).vectors if run.similar_file.exists()  # by the tests above
     else neighbours.unit_rows(np.random.default_rng(0).standard_normal((200, 1280))))
exact, _ = neighbours.knn(X, X[:20], 5)
neighbours.HNSW_MIN = 0
fake_run = SimpleNamespace(similar_graph_file=Path({str(tmp_path)!r}) / "similar.usearch")
def index():
    return similar.SimilarityIndex(X, [str(i) for i in range(len(X))], np.zeros(len(X), np.int64), ["a"],
                                   np.zeros(0, np.uint8), np.zeros(len(X) + 1, np.int64), "")
similar.with_graph(index(), fake_run)  # builds and saves the graph
assert fake_run.similar_graph_file.exists()
fresh = similar.with_graph(index(), fake_run)  # maps the saved one
found = [[int(n["path"]) for n in row] for row in fresh.search(X[:20], 5)]
recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact.tolist(), found)])
import onnxruntime
print("recall", recall)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.split("recall")[1]) >= 0.95, p.stdout


def test_nothing_below_the_data_engine_imports_it():
    """The layer rule of docs/architecture.md for the data engine: data,
    models, inference, evaluation and training never import imgclf.data_engine
    (they take its pieces as arguments), so it can change without touching them."""
    import ast

    from .conftest import ROOT

    below = ["data", "models", "inference", "evaluation", "training"]
    offenders = []
    for d in below:
        for f in sorted((ROOT / "imgclf" / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.startswith("imgclf.data_engine")]
    assert not offenders, offenders
