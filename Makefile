# plankton: one-command setup. Every target installs what it needs, idempotently.
#   make demo   - the main job on an embedded default dataset
#   make test   - the whole test suite (what CI runs): fmt, clippy -D warnings, tests
#   make lint   - cargo fmt --check and clippy with warnings as errors
#   make bench  - criterion benchmarks + Python baselines (see docs/BENCHMARKS.md)
#   make bench-train - a training step, ours vs the same network in PyTorch (docs/BENCHMARKS.md)
#   make crash-test - the daemon under random kill -9s (docs/BENCHMARKS.md)
#   make gpu-check-pack - the binary for the one-run GPU check (scripts/gpu_check.sh)
#   make GPU=1 libtorch - libtorch with its CUDA libraries, for a GPU machine that reaches PyPI
#                         (the same binary then uses the GPU; see README "On a GPU")

SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION := 2.11.0
LIBTORCH_DIR := .libtorch
# A GPU install (with the CUDA libraries) also serves the CPU: it is not replaced by a CPU one.
LIBTORCH_STAMP := $(firstword $(wildcard $(LIBTORCH_DIR)/.installed-$(TORCH_VERSION)-gpu) $(LIBTORCH_DIR)/.installed-$(TORCH_VERSION)$(if $(GPU),-gpu,-cpu))
PIP_FLAGS ?=
PYENV_DIR := .pyenv-tools
PYENV_STAMP := $(PYENV_DIR)/.installed-v1
PYENV_TORCH_DIR := .pyenv-torch
PYENV_TORCH_STAMP := $(PYENV_TORCH_DIR)/.installed-v1
CARGO ?= cargo
DEMO_DIR ?= demo-out

# CPU: libtorch_cpu needs only these two small CUDA runtime libraries (found via its rpath).
# GPU: the full CUDA dependency set that the torch wheel declares, so that libtorch_cuda.so,
# which the binary loads at run time for --device cuda/auto, finds its libraries. The build is
# the same either way. TORCH_VERSION is the GPU machine's PyTorch (2.11), so that a binary built
# here runs there against its own torch install (scripts/gpu_check.sh).
ifeq ($(GPU),)
TORCH_PIP := --no-deps torch==$(TORCH_VERSION) nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
else
TORCH_PIP := torch==$(TORCH_VERSION)
endif

.PHONY: promtool nats-server all libtorch build demo lint test bench bench-train crash-test gpu-check-pack pytools pytorch fixtures clean-demo

all: build

$(LIBTORCH_STAMP):
	@echo ">> installing libtorch $(TORCH_VERSION) from PyPI into $(LIBTORCH_DIR) (once, ~1.2 GB)"
	rm -rf $(LIBTORCH_DIR).tmp
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
		$(PIP_FLAGS) --target $(LIBTORCH_DIR).tmp $(TORCH_PIP)
	rm -rf $(LIBTORCH_DIR) && mv $(LIBTORCH_DIR).tmp $(LIBTORCH_DIR)
	touch $@

libtorch: $(LIBTORCH_STAMP)

build: libtorch
	$(CARGO) build --release

# Python oracle/baseline tools (numpy, scipy, scikit-image, Pillow; pyarrow, pandas, DuckDB and
# scikit-learn for the prediction reader test) for the tests, fixtures and benches.
$(PYENV_STAMP): scripts/requirements-tools.txt
	$(PYTHON) -m venv $(PYENV_DIR)
	$(PYENV_DIR)/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-tools.txt
	touch $@

pytools: $(PYENV_STAMP)

# PyTorch (the same version as our libtorch) for the training-step baseline only (~4.7 GB).
$(PYENV_TORCH_STAMP):
	$(PYTHON) -m venv $(PYENV_TORCH_DIR)
	$(PYENV_TORCH_DIR)/bin/pip install --quiet --disable-pip-version-check $(PIP_FLAGS) -r scripts/requirements-torch.txt
	touch $@

pytorch: $(PYENV_TORCH_STAMP)

demo: build
	./target/release/plankton demo --out $(DEMO_DIR)

# promtool (Debian's prometheus package, unpacked locally; nothing installed system-wide) checks
# the daemon's /metrics exposition in the tests.
PROMTOOL := .tools/bin/promtool
$(PROMTOOL):
	rm -rf .tools/deb && mkdir -p .tools/deb .tools/bin
	cd .tools/deb && (apt-get download prometheus || (apt-get update -qq && apt-get download prometheus))
	dpkg -x .tools/deb/prometheus_*.deb .tools/deb/x
	cp .tools/deb/x/usr/bin/promtool $@ && rm -rf .tools/deb

promtool: $(PROMTOOL)

# nats-server (Debian's package, unpacked locally) for the tests of the daemons as a JetStream
# consumer group; the tests start it themselves on loopback with a temporary store.
NATS_SERVER := .tools/bin/nats-server
$(NATS_SERVER):
	rm -rf .tools/deb-nats && mkdir -p .tools/deb-nats .tools/bin
	cd .tools/deb-nats && (apt-get download nats-server || (apt-get update -qq && apt-get download nats-server))
	dpkg -x .tools/deb-nats/nats-server_*.deb .tools/deb-nats/x
	cp .tools/deb-nats/x/usr/sbin/nats-server $@ && rm -rf .tools/deb-nats

nats-server: $(NATS_SERVER)

# Formatting and clippy (warnings are errors) over every crate, tests and benches included.
# --release: the build scripts (torch-sys compiles its C++ wrapper, minutes on 2 cores) are
# then the same units as the release test build's, so they are built once, not twice.
lint: libtorch
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Lint first; benches are compiled too (so they cannot rot); the last line totals every test
# binary of the workspace. PLANKTON_REQUIRE_PYTHON: the Parquet reader test must run (not skip).
test: libtorch pytools promtool nats-server lint
	$(CARGO) bench --workspace --no-run
	set -o pipefail; PATH="$(abspath .tools/bin):$$PATH" PLANKTON_REQUIRE_PYTHON=1 PLANKTON_REQUIRE_PROMTOOL=1 PLANKTON_REQUIRE_NATS=1 $(CARGO) test --release --workspace 2>&1 | tee target/test-output.log
	$(PYENV_DIR)/bin/python scripts/serve_crash_test.py --uploads 300 --kills 3 --out target/crash-test-smoke
	scripts/gpu_check.sh run --device cpu --tiny --binary target/release/plankton --out target/gpu-check-dry
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' target/test-output.log

bench: build pytools
	PLANKTON_PYTHON=$(abspath $(PYENV_DIR))/bin/python scripts/bench.sh

# A training step of convroll4 (full, 1/4 and 1/2 width), ours vs PyTorch, alternating runs.
bench-train: build pytorch
	PLANKTON_TORCH_PYTHON=$(abspath $(PYENV_TORCH_DIR))/bin/python scripts/train_step_compare.sh

# The daemon under random kill -9s: acknowledged vs present vs duplicated ids (make test runs a
# short one so the script cannot rot).
CRASH_UPLOADS ?= 20000
CRASH_KILLS ?= 20
crash-test: build pytools
	$(PYENV_DIR)/bin/python scripts/serve_crash_test.py --uploads $(CRASH_UPLOADS) --kills $(CRASH_KILLS) --out target/crash-test

# The one-run GPU check (scripts/gpu_check.sh): the stripped release binary in target/gpu-pack,
# to carry to a GPU machine, which runs `scripts/gpu_check.sh run --out DIR` there against its
# own PyTorch (make test runs the CPU dry run, so the script cannot rot).
gpu-check-pack: libtorch
	scripts/gpu_check.sh pack

# Regenerate the golden fixtures from the Python oracles (scikit-image, Pillow, mahotas, scipy).
fixtures: pytools
	$(PYENV_DIR)/bin/python tests/fixtures/warp/gen_warp_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/decode/gen_decode_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/tta/gen_tta_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/thumbnail/gen_thumbnail_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/evaluate/gen_evaluate_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/features/moments/gen_moments_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/features/haralick/gen_haralick_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/features/zernike/gen_zernike_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/features/lbp/gen_lbp_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/features/tas/gen_tas_fixtures.py
	$(PYENV_DIR)/bin/python tests/fixtures/blend/gen_blend_fixture.py

clean-demo:
	rm -rf $(DEMO_DIR)
