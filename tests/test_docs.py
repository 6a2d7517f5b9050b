"""The documentation site holds its promises: the CLI reference is the parser
(generated, so a new flag cannot go undocumented), and every command on the
getting-started page runs as written on real photos."""

from __future__ import annotations

import csv
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGE = ROOT / "docs" / "getting-started.md"


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_cli_reference_is_generated_from_the_parser():
    gen = runpy.run_path(str(ROOT / "tools" / "gen_cli_docs.py"), run_name="gen_cli_docs")
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == gen["render"](), "docs/cli.md is stale: run `python tools/gen_cli_docs.py` (or `make docs`)"
    parser = gen["build_parser"]()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for name, sp in sub.choices.items():  # every command and every flag of the real parser is on the page
        assert f"\n## {name}\n" in page
        for a in sp._actions:
            for flag in a.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, (name, flag)


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and all(f" {p}" in nav for p in pages), sorted(p for p in pages if f" {p}" not in nav)


@pytest.mark.slow
def test_getting_started_runs_as_written(tmp_path, tiny):
    """Every ```sh block of the page, in order, then its Python block, in a fresh
    folder beside ../shared/datasets (about 1.5 min on 2 busy cores: one Lite0 training)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "datasets").symlink_to(tiny.parent)
    cwd = tmp_path / "repo"
    cwd.mkdir()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "imgclf").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m imgclf "$@"\n')
    (shim / "imgclf").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    outputs = []
    for block in blocks(PAGE, "sh"):
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, f"{block}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        outputs.append(p.stdout)
    assert len(outputs) == 3
    assert "cats" in outputs[0] and "dogs" in outputs[0]  # check: per-class counts
    run = cwd / "runs" / "getting-started"
    assert (run / "model.pt").exists() and (run / "report" / "index.html").exists() and (run / "model.onnx").exists()
    rows = [r for r in csv.reader(io.StringIO(outputs[2])) if r and r[0].endswith(".jpg")]
    assert len(rows) == 50 and sum("cats" in r for r in rows) >= 40, rows[:5]  # the val cats, mostly called cats
    (code,) = blocks(PAGE, "python")
    *head, last = code.strip().splitlines()  # the page's last line is the call a reader would look at
    script = "\n".join([*head, f"out = {last}", "print(sum(r['label'] == 'dogs' for r in out), len(out))"])
    p = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    dogs, n = map(int, p.stdout.split()[-2:])
    assert n == 50 and dogs >= 40
