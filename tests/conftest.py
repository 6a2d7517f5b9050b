"""Shared fixtures: real data from ../shared/datasets, real models, and one
trained run reused by the tests that only read it (training is the slow part)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("IMGCLF_DATASETS", ROOT.parent / "shared" / "datasets"))
TINY = DATASETS / "cats_dogs_tiny"


def need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the tests read real images from ../shared/datasets "
                                f"(or set IMGCLF_DATASETS to its location)")
    return path


@pytest.fixture(scope="session")
def tiny() -> Path:
    return need(TINY)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """A feature cache private to this test session, so tests never read a
    developer's ~/.cache and always exercise the cold path at least once."""
    d = tmp_path_factory.mktemp("cache")
    os.environ["IMGCLF_CACHE_DIR"] = str(d)
    return d


def imgclf(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    p = subprocess.run([sys.executable, "-m", "imgclf", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"imgclf {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny) -> tuple[Path, subprocess.CompletedProcess]:
    """Default settings (EfficientNet-Lite0, frozen, linear head) on cats_dogs_tiny, via the CLI."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return out, imgclf("train", tiny, "--out", out)
