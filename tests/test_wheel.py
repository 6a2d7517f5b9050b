"""The release artifacts: `python -m build` makes a wheel and an sdist that
hold every package folder and the web app's vendored ONNX Runtime Web files
(git-ignored, so only package-data puts them there); `twine check` passes; and
the wheel, installed into a fresh venv with only the [serve] extra (no torch),
serves an exported .onnx to a real request."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from imgclf.deploy.web.vendor import VERSION
from tests.conftest import ROOT, imgclf
from tests.servers import free_port

PACKAGES = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "imgclf").rglob("__init__.py"))
VENDOR = sorted(p.name for p in (ROOT / "imgclf/deploy/web/vendor").glob("*") if p.is_file())


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    if not VENDOR:
        pytest.fail("imgclf/deploy/web/vendor is empty: run `make setup` (python -m imgclf.deploy.web.vendor) first")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the venv's setuptools, no fresh build env (seconds instead of a download)
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], check=True,
                   capture_output=True, text=True, timeout=600)
    return {"wheel": next(out.glob("imgclf-*.whl")), "sdist": next(out.glob("imgclf-*.tar.gz"))}


def test_wheel_and_sdist_hold_every_package_and_the_vendored_web_runtime(dist):
    wheel = zipfile.ZipFile(dist["wheel"]).namelist()
    sdist = tarfile.open(dist["sdist"]).getnames()
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in wheel, pkg
        assert any(n.endswith(f"/{pkg}/__init__.py") for n in sdist), pkg
    assert "imgclf/tasks/detect/__init__.py" in wheel
    for name in VENDOR:
        assert f"imgclf/deploy/web/vendor/{name}" in wheel, name
        assert any(n.endswith(f"imgclf/deploy/web/vendor/{name}") for n in sdist), name
    assert any(VERSION in n for n in wheel)
    for static in ("deploy/serve/static/index.html", "deploy/web/static/index.html"):
        assert f"imgclf/{static}" in wheel
    assert any(n.endswith("/CHANGELOG.md") for n in sdist)


def test_twine_check_passes(dist):
    p = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("PASSED") == 2


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_serves_an_onnx(dist, tmp_path, tiny):
    """About a minute on 2 busy cores: the venv and its [serve] dependencies (pip, from the local index)."""
    run = tmp_path / "run"
    imgclf("train", tiny, "--out", run, "--model", "small_cnn", "--image-size", "32", "--epochs", "1",
           "--batch-size", "50", "--workers", "0", "--no-evaluate")
    imgclf("export", run, "--format", "onnx")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", f"{dist['wheel']}[serve]"], capture_output=True,
                         text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    check = subprocess.run([str(venv / "bin/python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.stdout.strip() == "None"  # [serve] alone: no torch in the fresh venv
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    log = tmp_path / "serve.log"
    with open(log, "w") as f:  # cwd outside the repo: the installed wheel, not the source tree, is imported
        proc = subprocess.Popen([str(venv / "bin/imgclf"), "serve", str(run / "model.onnx"), "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, log)
        img = next((tiny / "val" / "cats").glob("*.jpg")).read_bytes()
        body, ctype = _multipart("file", "cat.jpg", img)
        req = urllib.request.Request(url + "/v1/predict", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = r.read().decode()
        assert r.status == 200 and ('"cats"' in answer or '"dogs"' in answer), answer
        with urllib.request.urlopen(url + "/", timeout=10) as r:  # the web page from the wheel's package data
            assert r.status == 200 and "<html" in r.read().decode().lower()
    finally:
        proc.terminate()
        proc.wait(10)
    assert str(venv) in subprocess.run([str(venv / "bin/python"), "-c", "import imgclf; print(imgclf.__file__)"],
                                       capture_output=True, text=True, cwd=tmp_path, env=env).stdout


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the installed server did not become ready:\n{log.read_text()}")
        time.sleep(0.3)


def _multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    b = "imgclf-wheel-test-boundary"
    head = (f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"
