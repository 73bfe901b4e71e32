# The README's commands. `make train` sets up and trains the default small VLM;
# `make test` sets up and runs every test (Catch2 through ctest, then pytest).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
BUILD ?= build
JOBS  ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: setup venv build install train test test-cpp test-python clean bench bench-full

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

# The benchmark suite: vlmkit beside a plain-PyTorch peer (quick: < 5 minutes;
# bench-full: < 30), then the C++ microbenchmarks. Results under results/bench*.
bench: install
	$(PY) benchmarks/suite.py --quick --out results/bench
	cmake -S . -B $(BUILD) -DVLMKIT_BUILD_BENCHMARKS=ON >/dev/null && cmake --build $(BUILD) --target vlmkit_micro
	$(BUILD)/vlmkit_micro --benchmark_min_time=0.2 --benchmark_out=results/bench/micro.json --benchmark_out_format=json

bench-full: install
	$(PY) benchmarks/suite.py --out results/bench-full
	cmake -S . -B $(BUILD) -DVLMKIT_BUILD_BENCHMARKS=ON >/dev/null && cmake --build $(BUILD) --target vlmkit_micro
	$(BUILD)/vlmkit_micro --benchmark_out=results/bench-full/micro.json --benchmark_out_format=json

clean:
	rm -rf $(BUILD) $(VENV) python/vlmkit.egg-info

# ---------------------------------------------------------------- sanitizers and fuzzing (clang)
# `make sanitize`: the C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer.
# `make fuzz`: each libFuzzer target for FUZZ_SECONDS from its corpus (same build).
# `make tsan`: the threaded loader's tests under ThreadSanitizer.
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:detect_odr_violation=0 \
  LSAN_OPTIONS=suppressions=$(abspath tests/fuzz/lsan.supp):print_suppressions=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
FUZZ_SECONDS ?= 30
FUZZ_SEED ?= 1

build-asan/build.ninja:
	bash scripts/setup.sh
	cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
	  -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g1" -DCMAKE_CXX_FLAGS="$(SAN_FLAGS) -fsanitize=fuzzer-no-link" \
	  -DVLMKIT_BUILD_TESTS=ON -DVLMKIT_BUILD_FUZZERS=ON

sanitize: build-asan/build.ninja
	$(SAN_ENV) cmake --build build-asan --parallel $(JOBS)
	cd build-asan && $(SAN_ENV) VLMKIT_EXPECT_BLAS=openblas ctest -E 'consumer_project' --output-on-failure -j $(JOBS)

# scripts/fuzz.sh fails on a non-zero exit, on any artifact (crash, leak, timeout,
# oom, slow unit), on a target that is missing or that libFuzzer did not run.
# The fuzzers grow a work corpus (build-asan/fuzz-corpus/, kept between runs);
# `make fuzz-merge` folds what adds coverage into tests/fuzz/corpus/ to commit.
# Longer runs outside CI: `make fuzz FUZZ_SECONDS=600 FUZZ_SEED=0` (0: a random seed).
fuzz: sanitize
	$(SAN_ENV) bash scripts/fuzz.sh --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

fuzz-merge:
	$(SAN_ENV) bash scripts/fuzz.sh --merge

tsan: 
	bash scripts/setup.sh
	cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
	  -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g1" -DCMAKE_CXX_FLAGS="-fsanitize=thread" -DVLMKIT_BUILD_TESTS=ON
	cmake --build build-tsan --parallel $(JOBS) --target vlmkit_tests
	TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$(abspath tests/fuzz/tsan.supp) build-tsan/tests/cpp/vlmkit_tests "[loader]"

.PHONY: sanitize fuzz fuzz-merge tsan
