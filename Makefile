# Two entry points: `make bench` (the backend benchmark) and `make test`.
# Both create .venv on first use; nothing is needed beforehand but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build so a dev setup does not pull GBs of CUDA.
TORCH  ?= torch==2.13.0

.PHONY: venv test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: venv
	$(PY) -m pytest -q -rs tests

bench: venv
	$(PY) -m benchmarks.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
