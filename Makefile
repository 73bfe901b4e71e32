# The README's commands. `make train` sets up and runs the main job;
# `make test` sets up and runs every test (Catch2 through ctest, then pytest).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
BUILD ?= build
JOBS  ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: setup venv build install train test test-cpp test-python clean

setup:
	bash scripts/setup.sh

$(PY):
	/usr/bin/python3 -m venv --system-site-packages $(VENV)

venv: setup $(PY)

build: venv
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DVLMKIT_BUILD_TESTS=ON \
	  -DVLMKIT_BUILD_PYTHON=ON -DPython_EXECUTABLE=$(abspath $(PY)) $(CMAKE_FLAGS)
	cmake --build $(BUILD) --parallel $(JOBS)

# Reuses $(BUILD): setup.py only copies the already-built extension.
install: build
	VLMKIT_BUILD_DIR=$(abspath $(BUILD)) $(PY) -m pip install --no-build-isolation --no-deps -q .

train: install
	$(VENV)/bin/vlmkit train

# scripts/setup.sh makes OpenBLAS serve LibTorch; the tests check it did.
test-cpp: build
	VLMKIT_EXPECT_BLAS=openblas ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-python: install
	cd tests/python && VLMKIT_BUILD_DIR=$(abspath $(BUILD)) VLMKIT_EXPECT_BLAS=openblas ../../$(PY) -m pytest -q

test: test-cpp test-python

clean:
	rm -rf $(BUILD) $(VENV) python/vlmkit.egg-info
