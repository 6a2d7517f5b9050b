# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-all lint docs dist bench browser clean

# Idempotent: re-installs only when pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# ONNX Runtime Web for `export --format web`: the pinned npm tarball, sha512-checked,
# unpacked into imgclf/deploy/web/vendor/ (git-ignored, package data). Once.
WEB_VENDOR := imgclf/deploy/web/vendor/onnxruntime-web-$(shell sed -n 's/^VERSION = "\(.*\)"/\1/p' imgclf/deploy/web/vendor.py)
$(WEB_VENDOR): imgclf/deploy/web/vendor.py | $(STAMP)
	$(BIN)/python -m imgclf.deploy.web.vendor

setup: $(STAMP) $(WEB_VENDOR)

demo: setup
	$(BIN)/python -m imgclf.demo

# The suite: real images from ../shared/datasets, about 8 minutes on 2 cores.
# Two workers (pytest-xdist), a test file each at a time: much of the suite
# waits on subprocesses, servers and Chromium, so the second core fills in.
test: setup browser lint docs
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile

test-all: setup browser lint docs
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The house rules: ruff's small rule set, the layer contract (function-level
# imports count), and no import cycle or unexplained deferred import.
lint: setup
	$(BIN)/ruff check imgclf tests bench tools
	$(BIN)/lint-imports
	$(BIN)/python tools/import_report.py --check

# The documentation site: docs/cli.md regenerated from the parser, then a strict
# build (a broken link, a missing page or a failing API reference fails) into site/.
docs: setup
	$(BIN)/python tools/gen_cli_docs.py
	$(BIN)/mkdocs build --strict -q

# The release artifacts in dist/: a wheel and an sdist with the vendored web runtime, checked.
dist: setup $(WEB_VENDOR)
	rm -rf dist && $(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

bench: setup
	$(BIN)/python bench/bench_train.py

# Debian's Chromium for the browser tests; they skip, saying why, where it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "note: chromium not installed (needs root and apt); browser tests will be skipped"

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache
