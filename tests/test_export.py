"""Export (ONNX fp32 / INT8, TorchScript) of a real model trained on
cats_dogs_tiny, predicting from the .onnx, and the torch-free path."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, imgclf

_EXPORTED: dict[str, tuple[Path, dict]] = {}


def export_once(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """One fp32 ONNX export per test session, shared by the export, serve and
    browser tests (a session fixture defined here would be rebuilt per module)."""
    run, _ = tiny_run
    if str(run) not in _EXPORTED:
        out = tmp_path_factory.mktemp("export") / "tiny.onnx"
        p = imgclf("export", run, "--out", out, "--json")
        report = json.loads(p.stdout[p.stdout.index("{"):])
        _EXPORTED[str(run)] = (out, report)
    return _EXPORTED[str(run)]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    return export_once(tiny_run, tmp_path_factory)


def val_images(tiny: Path, n: int = 3) -> dict[str, list[Path]]:
    return {c: sorted((tiny / "val" / c).iterdir())[:n] for c in ("cats", "dogs")}


def test_onnx_export_parity_and_metadata(exported, tiny_run, tiny):
    import onnx
    import onnxruntime as ort

    path, report = exported
    assert path.exists() and report["max_abs_diff"] <= 1e-4 and report["check_images"] >= 16
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["classes"]) == ["cats", "dogs"]
    assert json.loads(meta["input_size"]) == 208 and meta["resize"] == "crop"
    assert json.loads(meta["preprocess"])["size"] == 208
    assert meta["imgclf_version"] and meta["arch"] == "efficientnet_lite1"
    assert 0.8 <= json.loads(meta["metrics"])["accuracy"] <= 1.0

    # Lite's TensorFlow padding is folded into the convolutions (models/same_pad.py):
    # no Pad node is left for onnxruntime to run between them, and yet the
    # probabilities below match PyTorch's dynamic padding.
    ops = [n.op_type for n in m.graph.node]
    assert "Pad" not in ops and any(a.name == "pads" and list(a.ints)[:2] != list(a.ints)[2:]
                                    for n in m.graph.node if n.op_type == "Conv" for a in n.attribute)

    # The graph: uint8 NHWC in, a dynamic batch, probabilities out.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [208, 208, 3] and not isinstance(inp.shape[0], int)

    # Independently of the export's own check: the .onnx gives PyTorch's
    # probabilities on real validation images, batched or one at a time.
    import imgclf as lib

    files = [f for fs in val_images(tiny).values() for f in fs]
    p_torch = lib.load(tiny_run[0], engine="torch").predict_proba(files)
    clf = lib.load(path)
    p_onnx = clf.predict_proba(files)
    assert np.abs(p_onnx - p_torch).max() <= 1e-4
    np.testing.assert_allclose(p_onnx.sum(1), 1.0, atol=1e-5)
    x = np.stack([clf.prepare(f) for f in files])
    one = np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(one, p_onnx, atol=1e-5)


def test_predict_cli_with_onnx(exported, tiny, tmp_path):
    path, _ = exported
    imgs = val_images(tiny, 2)
    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image")
    p = imgclf("predict", path, *imgs["cats"], *imgs["dogs"], junk, "--format", "json", "--top-k", "2", check=False)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r.get("label") for r in rows[:4]] == ["cats", "cats", "dogs", "dogs"]
    assert all(len(r["top"]) == 2 and r["score"] > 0.5 for r in rows[:4])
    assert "not an image" in rows[4]["error"]


def test_onnx_without_torch(exported, tiny):
    """An inference-only install: torch made unimportable, then load, predict,
    the CLI and the server all work from the .onnx file alone."""
    path, _ = exported
    cat, dog = val_images(tiny, 1)["cats"][0], val_images(tiny, 1)["dogs"][0]
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import imgclf
        clf = imgclf.load({str(path)!r})
        r = clf.predict([{str(cat)!r}, {str(dog)!r}], top_k=1)
        assert [x["label"] for x in r] == ["cats", "dogs"], r
        from imgclf.cli import main
        assert main(["predict", {str(path)!r}, {str(dog)!r}, "--format", "json"]) == 0
        from fastapi.testclient import TestClient
        from imgclf.deploy.serve import ServeConfig, create_app
        with TestClient(create_app(ServeConfig({str(path)!r}))) as c:
            j = c.post("/v1/predict", files={{"file": ("c.jpg", open({str(cat)!r}, "rb").read())}}).json()
            assert j["predictions"][0]["label"] == "cats", j
            assert "torch" not in c.get("/v1/model").json()["versions"]
        print("TORCH_FREE_OK", [m for m in ("torch", "torchvision", "timm") if sys.modules.get(m) is not None])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TORCH_FREE_OK []" in p.stdout
    assert '"label": "dogs"' in p.stdout


def test_onnx_load_errors(tmp_path):
    import imgclf as lib

    with pytest.raises(FileNotFoundError, match="imgclf export"):
        lib.load(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        lib.load(bad)
    (tmp_path / "bad.tflite").write_bytes(b"not a model either")
    with pytest.raises(ValueError, match="not a TFLite model.*--format tflite"):
        lib.load(tmp_path / "bad.tflite")
    with pytest.raises(FileNotFoundError, match="--format tflite"):
        lib.load(tmp_path / "missing.tflite")


def test_int8_export(tiny_run, exported, tmp_path):
    """Static INT8 of the default model, calibrated on 32 train images, passes
    its own gate: validation accuracy within a point of fp32 and the same top-1
    answer on at least 99% of the validation images (the recipe before
    ReLU6 was quantized with its convolution agreed on 98% and was refused)."""
    run, _ = tiny_run
    out = tmp_path / "tiny.int8.onnx"
    p = imgclf("export", run, "--int8", "--calib-images", "32", "--out", out, "--json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "INT8: val accuracy" in p.stdout and "top-1 as fp32 on" in p.stdout and "images/s" in p.stdout
    r = json.loads(p.stdout[p.stdout.index("{"):])
    assert r["int8"] and r["calib_images"] == 32 and r["val_images"] == 100
    assert r["fp32_accuracy"] - r["int8_accuracy"] <= 0.01 + 1e-9 and r["speedup"] > 0
    assert r["int8_top1_agreement_vs_fp32"] >= 0.99, r
    assert out.stat().st_size == r["bytes"] < 0.5 * exported[0].stat().st_size  # int8 weights: ~4x smaller
    import imgclf as lib

    clf = lib.load(out)
    assert clf.int8 and clf.classes == ["cats", "dogs"]
    cats = clf.predict(val_images(Path(json.loads((run / "splits.json").read_text())["root"]), 3)["cats"])
    assert [c["label"] for c in cats].count("cats") >= 2


def test_int8_verdict():
    from imgclf.deploy.export_common import int8_verdict

    assert int8_verdict(0.98, 0.97, 1.0, False) is None
    assert int8_verdict(0.98, 0.99, 1.0, False) is None
    why = int8_verdict(0.98, 0.95, 1.0, False, 0.96, 0.99)
    assert "3.0 points" in why and "top-1 as fp32 on 96.0%" in why and "--force" in why
    assert int8_verdict(0.98, 0.95, 1.0, True) is None
    assert int8_verdict(0.98, 0.95, 5.0, False) is None
    # Accuracy unchanged, yet 4% of the answers changed (both ways): refused.
    why = int8_verdict(0.98, 0.98, 1.0, False, 0.96, 0.99)
    assert "4.0% of validation images" in why and "under the limit of 99.0%" in why and "--min-agreement" in why
    assert int8_verdict(0.98, 0.98, 1.0, False, 0.99, 0.99) is None
    assert int8_verdict(0.98, 0.98, 1.0, True, 0.5, 0.99) is None


def test_torchscript_export(tiny_run, exported, tiny, tmp_path):
    import torch

    import imgclf as lib

    run, _ = tiny_run
    out = tmp_path / "m.torchscript.pt"
    imgclf("export", run, "--format", "torchscript", "--out", out)
    extra = {"imgclf.json": ""}
    m = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["imgclf.json"])
    assert json.loads(meta["classes"]) == ["cats", "dogs"]
    clf = lib.load(exported[0])
    files = [f for fs in val_images(tiny, 2).values() for f in fs]
    x = np.stack([clf.prepare(f) for f in files])
    with torch.inference_mode():
        p, u, rejected = (t.numpy() for t in m(torch.from_numpy(x)))  # as the ONNX graph's outputs
    np.testing.assert_allclose(p, clf.probs(x), atol=1e-4)
    assert np.abs(u - clf.outputs(x)[1]).max() <= 0.011 and not rejected.any()  # this run has --reject off


def test_export_errors(tmp_path):
    p = imgclf("export", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "no trained model here" in p.stderr


def test_ort_format_export(tiny_run, exported, tiny, tmp_path):
    """ONNX Runtime Mobile's .ort: checked against the .onnx and PyTorch, same
    metadata, and predicted and served like an .onnx (no torch)."""
    import imgclf as lib

    run, _ = tiny_run
    out = tmp_path / "m.ort"
    p = imgclf("export", run, "--format", "ort", "--out", out, "--json")
    r = json.loads(p.stdout[p.stdout.index("{"):])
    assert r["format"] == "ort" and r["ort_max_abs_diff_vs_onnx"] <= 1e-5 and r["ort_max_abs_diff_vs_torch"] <= 1e-4
    assert out.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier: ORT format, not protobuf ONNX
    files = [f for fs in val_images(tiny, 3).values() for f in fs]
    ort_clf, onnx_clf = lib.load(out), lib.load(exported[0])
    assert ort_clf.classes == ["cats", "dogs"] and ort_clf.preprocess == onnx_clf.preprocess
    np.testing.assert_allclose(ort_clf.predict_proba(files), onnx_clf.predict_proba(files), atol=1e-5)
    rows = json.loads(imgclf("predict", out, *files, "--format", "json").stdout)
    assert [x["label"] for x in rows] == ["cats"] * 3 + ["dogs"] * 3


_EXPORT_CHILD = """
import json, logging, sys
from imgclf.config import ExportConfig
from imgclf.deploy.export import export
from imgclf.errors import ExportError

class Said(logging.Handler):  # what export tells its caller, through the standard logging API
    def emit(self, record):
        said.append(record.getMessage())

logging.getLogger("imgclf").addHandler(Said())
logging.getLogger("imgclf").setLevel(logging.INFO)
out = []
for kw in json.loads(sys.argv[1]):
    said = []
    try:
        out.append({"report": export(ExportConfig(**kw)), "said": said})
    except ExportError as e:
        out.append({"error": str(e), "said": said})
print("RESULT" + json.dumps(out, default=str))
"""


def _exports_in_a_child(configs: list[dict]) -> list[dict]:
    p = subprocess.run([sys.executable, "-c", _EXPORT_CHILD, json.dumps(configs)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0 and "RESULT" in p.stdout, p.stdout + p.stderr
    return json.loads(p.stdout.rsplit("RESULT", 1)[1])


def test_tflite_export(tiny_run, tiny, tmp_path):
    """LiteRT for Android: fp32 and INT8 from one conversion (the converter is
    slow to import), each checked on real validation images with the LiteRT
    interpreter; metadata readable from the file; INT8 refused over the gate;
    `imgclf predict` runs the .tflite without torch."""
    if importlib.util.find_spec("litert_torch") is None:
        pytest.skip("needs the mobile extra: pip install 'imgclf[mobile]' (make setup)")
    from ai_edge_litert.interpreter import Interpreter

    import imgclf as lib
    from imgclf.inference.litert_predictor import associated_files, read_metadata
    from imgclf.runs import RunDir

    run, _ = tiny_run
    fp32, int8 = tmp_path / "m.tflite", tmp_path / "m.int8.tflite"
    # fp32, INT8 over an impossible gate (refused), INT8: one child process, one
    # conversion. A child, because the converter brings in JAX's threads, and a
    # later DataLoader fork in this process could deadlock on them.
    r, refused, r8 = _exports_in_a_child([
        dict(run=str(run), format="tflite", out=str(fp32)),
        dict(run=str(run), format="tflite", int8=True, max_drop=-0.5, out=str(int8) + ".refused"),
        dict(run=str(run), format="tflite", int8=True, out=str(int8))])
    said = r["said"] + r8["said"]
    r, r8 = r["report"], r8["report"]
    assert r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0 and r["check_images"] >= 16
    assert any("parity (LiteRT)" in s for s in said)

    data = fp32.read_bytes()
    assert data[4:8] == b"TFL3" and r["bytes"] == len(data)
    meta = read_metadata(data)
    assert meta["classes"] == ["cats", "dogs"] and meta["preprocess"]["size"] == 208 and meta["resize"] == "crop"
    assert meta["model_sha256"] == RunDir(run).model_sha256() and meta["int8"] is False
    assert meta["temperature"] == pytest.approx(RunDir(run).record().get("temperature", 1.0))
    files = associated_files(data)  # TFLite's associated-files zip, for apps
    assert files["labels.txt"].decode().split() == ["cats", "dogs"]
    assert json.loads(json.loads(files["imgclf.json"])["classes"]) == ["cats", "dogs"]

    # Independently of the export's own check: the interpreter, called as an
    # app would (uint8 NHWC in, probabilities out), gives PyTorch's answers.
    it = Interpreter(model_path=str(fp32))
    inp = it.get_signature_runner("serving_default").get_input_details()["images"]
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, 208, 208, 3]
    runner = it.get_signature_runner("serving_default")
    torch_clf = lib.load(run, engine="torch")
    paths = [f for fs in val_images(tiny, 3).values() for f in fs]
    x = np.stack([torch_clf.prepare(f) for f in paths])
    p = np.concatenate([runner(images=x[i:i + 1])["probs"] for i in range(len(x))])
    assert np.abs(p - torch_clf.probs(x)).max() <= 1e-4

    # INT8: refused (nothing written) when the gate cannot be met, written when it is.
    assert "over the limit" in refused["error"] and not Path(str(int8) + ".refused").exists()
    assert r8["val_images"] == 100 and r8["fp32_accuracy"] - r8["int8_accuracy"] <= 0.01 + 1e-9
    assert 0.9 <= r8["int8_top1_agreement_vs_fp32"] <= 1.0 and "int8_max_abs_diff_vs_fp32" in r8
    assert int8.stat().st_size < 0.5 * len(data) and read_metadata(int8.read_bytes())["int8"] is True

    # The phone's file on the desktop: the server and the CLI, torch unimportable.
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from fastapi.testclient import TestClient
        from imgclf.deploy.serve import ServeConfig, create_app
        with TestClient(create_app(ServeConfig({str(int8)!r}))) as c:
            j = c.post("/v1/predict", files={{"file": ("d.jpg", open({str(paths[-1])!r}, "rb").read())}}).json()
            assert j["predictions"][0]["label"] == "dogs", j
            m = c.get("/v1/model").json()
            assert m["format"] == "tflite" and m["int8"] and "torch" not in m["versions"], m
        from imgclf.cli import main
        sys.exit(main(["predict", {str(int8)!r}, *{[str(f) for f in paths]!r}, "--format", "json"]))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [row["label"] for row in json.loads(p.stdout)] == ["cats"] * 3 + ["dogs"] * 3
    assert "XNNPACK" not in p.stderr  # the interpreter's C++ chatter stays hidden


def test_tflite_needs_mobile_extra():
    """Without the converter installed, the error names the extra to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["litert_torch"] = None
        from imgclf.deploy.tflite import _need_mobile
        from imgclf.errors import MissingExtra
        try:
            _need_mobile()
        except MissingExtra as e:
            print("MISSING", e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "MISSING" in p.stdout and "pip install 'imgclf[mobile]'" in p.stdout, p.stdout + p.stderr
