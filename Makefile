# Two entry points: `make bench` (the backend benchmark) and `make test` (which runs
# `make typecheck` and `make wheel-check` before the suite).
# Both create .venv on first use; nothing is needed beforehand but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build so a dev setup does not pull GBs of CUDA.
TORCH  ?= torch==2.13.0

.PHONY: venv tools test typecheck wheel-check test-oldest bench bench-full bench-space fuzz soak clean

venv: $(VENV)/.installed

# The FUSE backend (tests and benchmark) mounts a Drive-like rclone remote:
# install rclone and fuse3 from the distribution when they are missing.
tools:
	@if ! command -v rclone >/dev/null || ! command -v fusermount3 >/dev/null; then \
	    SUDO=""; if [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi; \
	    $$SUDO apt-get update && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rclone fuse3; \
	fi

# The extras are installed with the installed torch required again, so no
# dependency (s3torchconnector, lightning, ...) may replace it. Redone when
# pyproject.toml or the version changes (the editable install's metadata holds it).
$(VENV)/.installed: pyproject.toml ckptstore/_version.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]" "$$($(PY) -c 'import torch; print("torch==" + torch.__version__)')"
	touch $@

# The two quick checks run first, so a broken package fails in a minute or two and
# pytest's summary stays the last thing printed.
# The suite runs in TEST_WORKERS processes (pytest-xdist): most of its time is spent waiting
# (timeouts, servers, subprocesses of real ranks and kernels), which overlaps well on 2 cores.
TEST_WORKERS ?= 2
test: venv tools typecheck wheel-check
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) tests

# mypy over the public API as a user's code meets it (tests/typecheck_public.py) and
# the modules that define it; what it checks is set in pyproject.toml ([tool.mypy]).
typecheck: venv
	$(PY) -m mypy

# The package as a user installs it: build the sdist and the wheel from it (in
# build's isolated environment, so with pyproject.toml's build requirements), check
# their metadata, install the wheel (not editable) into a new venv outside the repo
# holding only torch and the wheel's dependencies, and run tests/smoke_wheel.py there.
WHEEL_DIST := build/wheel-check
wheel-check: venv
	rm -rf $(WHEEL_DIST)
	$(PY) -m build --quiet --outdir $(WHEEL_DIST) .
	$(PY) -m twine check --strict $(WHEEL_DIST)/*
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  echo "wheel-check: a new venv in $$tmp with $(TORCH) and $$(cd $(WHEEL_DIST) && ls *.whl)"; \
	  $(PYTHON) -m venv "$$tmp/venv"; \
	  "$$tmp/venv/bin/python" -m pip install --quiet "$(TORCH)"; \
	  "$$tmp/venv/bin/python" -m pip install --quiet $(WHEEL_DIST)/*.whl \
	      "torch==$$("$$tmp/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"; \
	  cd "$$tmp" && "$$tmp/venv/bin/python" -I "$(CURDIR)/tests/smoke_wheel.py" "$(CURDIR)"

# The property-based hostile-input tests with many more cases and random seeds:
# FUZZ_CASES for each local property (5 of them), a third as many for the one on
# S3. `make test` runs them with 150 fixed-seed cases each (50 on S3).
FUZZ_CASES ?= 20000
fuzz: venv
	CKPTSTORE_FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest -q --hypothesis-show-statistics tests/test_hostile.py

# The Colab-like soak, long version: a notebook in a real Jupyter kernel trains
# to a Drive-like rclone mount while the "VM" (kernel and rclone) is killed
# SOAK_DEATHS times at random instants; writes benchmarks/results/soak/report.{md,json}.
# `make test` runs a short one (3 deaths, tests/test_soak.py).
SOAK_DEATHS ?= 30
soak: venv tools
	$(PY) tests/helpers/soak.py --deaths $(SOAK_DEATHS) --report benchmarks/results/soak

# The suite with the oldest fsspec, s3fs, gcsfs and numpy that pyproject.toml
# allows (aiobotocore 2.18 is the first that allows botocore 1.36, which sends a
# precomputed CRC-32C without awscrt), in a venv of its own.
OLDEST := "fsspec==2024.12.0" "s3fs==2024.12.0" "gcsfs==2024.12.0" "numpy==1.23.5" "aiobotocore==2.18.0"
test-oldest: tools
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip
	.venv-oldest/bin/python -m pip install --quiet "$(TORCH)"
	.venv-oldest/bin/python -m pip install --quiet -e ".[dev]" $(OLDEST)
	.venv-oldest/bin/python -m pytest -q -rs tests

# `make bench`: the quick benchmark, about 3 minutes on 2 cores once installed: ckptstore
# against torch.save / torch.load (and its mmap), safetensors, boto3 and s3torchconnector at
# 128 MiB on the local disk, a Drive-like rclone mount and S3 (moto), into a new
# benchmarks/results/runs/<date>-<time>/ (table printed, PNG written). `make bench-full` (or
# `make bench BENCH=full`) is every scenario and row, over an hour, and alone rewrites
# benchmarks/results/latest.* and the generated tables of README.md and docs/benchmarks.md.
# Options reach the script: `make bench ARGS="--backends s3 --size 1GiB"`.
# It installs the `bench` extra (not `dev`) into .venv, torch pinned as for `venv`.
$(VENV)/.bench-installed: pyproject.toml ckptstore/_version.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import torch' 2>/dev/null || { $(PY) -m pip install --quiet --upgrade pip && \
	    $(PY) -m pip install --quiet "$(TORCH)"; }
	$(PY) -m pip install --quiet -e ".[bench]" "$$($(PY) -c 'import torch; print("torch==" + torch.__version__)')"
	touch $@

bench: $(VENV)/.bench-installed tools
	$(PY) -m benchmarks.bench $(if $(filter full,$(BENCH)),--full) $(ARGS)

bench-full: $(VENV)/.bench-installed tools
	$(PY) -m benchmarks.bench --full $(ARGS)

# `make bench-space`: what compression and thinning save (benchmarks/space.py): stored / logical
# bytes of a briefly trained LM's state, save and load speed with compression=None/"auto"/"zstd"
# on the local disk, on an rclone mount and moto's S3 at 50 MiB/s, and a 10,000-step run's bytes
# on disk; about 10 minutes on 2 cores (`ARGS=--quick`: about 5). Writes benchmarks/results/space/.
bench-space: $(VENV)/.bench-installed tools
	$(PY) -m benchmarks.space $(ARGS)

clean:
	rm -rf $(VENV) .venv-oldest build dist *.egg-info .pytest_cache
