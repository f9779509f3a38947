# Two entry points: `make bench` (the backend benchmark) and `make test`.
# Both create .venv on first use; nothing is needed beforehand but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build so a dev setup does not pull GBs of CUDA.
TORCH  ?= torch==2.13.0

.PHONY: venv tools test test-oldest bench fuzz soak clean

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
# dependency (s3torchconnector, lightning, ...) may replace it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]" "$$($(PY) -c 'import torch; print("torch==" + torch.__version__)')"
	touch $@

test: venv tools
	$(PY) -m pytest -q -rs tests

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

bench: venv tools
	$(PY) -m benchmarks.bench

clean:
	rm -rf $(VENV) .venv-oldest build *.egg-info .pytest_cache
