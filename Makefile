# Two entry points: `make demo` runs the whole pipeline on the built-in tiny model, `make test` runs the checks.
# The virtual environment is built once and reused; pip's wheel cache keeps the llama-cpp-python build
# (about 4 minutes from source) so a fresh clone on the same machine installs in seconds.
VENV ?= .venv
PY := $(VENV)/bin/python
DSV4 := $(VENV)/bin/dsv4
# `make setup GPU=cuda|rocm|vulkan|metal` rebuilds llama-cpp-python (same version) with that GPU backend;
# without GPU= the wheel is CPU-only and `dsv4 chat` refuses GPU placements (see README, GPU builds).
GPU ?=
GPU_CMAKE_cuda := -DGGML_CUDA=on
GPU_CMAKE_rocm := -DGGML_HIP=on
GPU_CMAKE_vulkan := -DGGML_VULKAN=on
GPU_CMAKE_metal := -DGGML_METAL=on

.PHONY: setup engine demo test test-fast lint bench browser

setup: $(VENV)/.installed engine
ifneq ($(GPU),)
ifeq ($(GPU_CMAKE_$(GPU)),)
$(error GPU=$(GPU): choose cuda, rocm, vulkan or metal)
endif
setup: $(VENV)/.gpu-$(GPU)
endif

$(VENV)/.gpu-%: $(VENV)/.installed
	CMAKE_ARGS="$(GPU_CMAKE_$*)" $(PY) -m pip install --force-reinstall --no-cache-dir --no-deps \
		"llama-cpp-python==$$($(PY) -c 'import llama_cpp; print(llama_cpp.__version__)')"
	rm -f $(VENV)/.gpu-*
	touch $@

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# llama-server and its tools from the llama.cpp that llama-cpp-python vendors (`dsv4 serve` runs it): about
# 6 minutes on 2 cores the first time, instant afterwards (cached outside the clone, see `dsv4 engine build`).
# The CPU build always (the tests serve with it); with GPU= also that backend's, which `dsv4 serve` prefers.
engine: $(VENV)/.installed
	$(DSV4) engine build
ifneq ($(GPU),)
	$(DSV4) engine build --gpu $(GPU)
endif

demo: setup
	$(DSV4) pull tiny
	$(DSV4) quantize tiny --force
	$(DSV4) plan tiny
	$(DSV4) chat tiny -p "Hello" --max-tokens 48

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Debian's Chromium for the chat page's browser test (tests/test_serve_webui.py skips, saying why, without it).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "make browser: could not install chromium with apt; the browser test will skip"

test: lint browser
	$(PY) -m pytest

# The fast tier for while you work (under 90 s): no llama.cpp model loads, fuzzing, servers or engine builds
# (the markers are in tests/conftest.py). `make test` runs everything.
FAST := not slow and not fuzz and not server and not engine_build
test-fast: setup
	$(PY) -m pytest -m "$(FAST)"

bench: setup
	$(PY) bench/pull.py
	$(PY) bench/quantize.py
	$(PY) bench/chat.py
	$(PY) bench/serve.py
	$(PY) bench/rpc.py
	$(PY) bench/plan.py --decode 64
	$(PY) bench/repack.py
