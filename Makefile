# wsmanager — set-up, build, test, run.  `make run` and `make test` do all the set-up on a fresh
# machine: Debian packages with apt-get when absent, Python packages into .venv from PyPI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := libwslay-dev pkg-config redis-server chromium
CSRC := $(wildcard csrc/*.c csrc/*.h)
EXT := $(firstword $(wildcard wsmanager/_core*.so))
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: all sysdeps benchdeps venv build test ctest test-asan run run-seed bench bench-quick clean

all: build

# Debian packages: installed only when one is missing (root on CI and dev machines).
sysdeps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml setup.py | sysdeps $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(STAMP)

# The extension is rebuilt in place whenever a C file changes (flock: helpers may build at once).
build: sysdeps $(STAMP)
	@flock .build.lock $(PY) setup.py -q build_ext --inplace

test: build ctest
	$(PY) -m pytest -q

# C unit tests (ctests/): the connection, scanner and data structures with no engine, thread
# or Python, under AddressSanitizer + UBSan. Last line: "ctest: N passed, N failed".
CTEST_SRC := $(wildcard ctests/*.c) csrc/conn.c csrc/scan.c csrc/frame.c csrc/timer.c csrc/sweep.c \
	csrc/strmap.c csrc/registry.c
ctests/run: $(CTEST_SRC) $(wildcard ctests/*.h csrc/*.h) | sysdeps
	gcc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer \
	  -fsanitize=address,undefined -fno-sanitize-recover=undefined -Icsrc $(CTEST_SRC) \
	  -lwslay -lpthread -o $@

ctest: ctests/run
	ctests/run

# The whole suite with the extension built under AddressSanitizer + UBSan.
test-asan: sysdeps $(STAMP)
	rm -f wsmanager/_core*.so
	WSMANAGER_SANITIZE=address,undefined flock .build.lock $(PY) setup.py -q build_ext --inplace --force
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONMALLOC=malloc $(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	rm -f wsmanager/_core*.so; flock .build.lock $(PY) setup.py -q build_ext --inplace --force; exit $$rc

# The chat example on the native plane (python -m wsmanager = uvicorn --ws wsmanager.uvicorn:...).
run: build
	$(PY) -m wsmanager examples.chat.app:app --host $(HOST) --port $(PORT)

# The seed's own endpoint (one import changed), native plane.
run-seed: build
	$(PY) -m wsmanager examples.seed_endpoint.app:app --host $(HOST) --port $(PORT)

# Benchmarks (benchmarks/README.md): writes benchmarks/RESULTS.md and the charts.
# perf for the profile scenario, best effort: without it that scenario is skipped.
benchdeps:
	@command -v perf >/dev/null || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends linux-perf || echo "linux-perf not installed: no perf profile"; }

bench: build benchdeps
	$(PY) -m pip install -q -e ".[bench]"
	$(MAKE) -C benchmarks
	$(PY) benchmarks/run.py

bench-quick: build benchdeps
	$(PY) -m pip install -q -e ".[bench]"
	$(MAKE) -C benchmarks
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf build wsmanager/_core*.so *.egg-info .pytest_cache
	$(MAKE) -C benchmarks clean
