# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing, install torch (the CPU wheel pip finds on this
# machine's disk) and the package with its dev extras, and make sure Fashion-MNIST is there.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BT     := $(VENV)/bin/branchy-tee
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: all setup data tools enclave-env demo demo-banner lint test fuzz bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP)

data:
	@scripts/ensure-fashion-mnist.sh

# Test tools from the system: strace (the enclave's run-time file policy test).
tools:
	@scripts/ensure-strace.sh

# The enclave's own Python environment (.enclave-env): the standard library and only what the enclave
# runs, from the `enclave` extra's pins. `branchy-tee enclave build` makes or reuses the same one.
enclave-env: setup
	$(BT) enclave env

# The main job: every party on this machine (train, calibrate, seal, key brokers, enclave, results).
# The model is trained once and cached in runs/cache/ (shared with `make bench`).
demo: demo-banner setup data
	$(BT) demo

demo-banner:
	@echo "make demo: on a fresh clone about 5 minutes here (set-up about 1, training the model about 3,"
	@echo "           the rest under 1); under a minute once the model is cached in runs/cache/"

# ruff (lint and format) and mypy (strict for the enclave side), configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check src tests fuzz scripts
	$(VENV)/bin/ruff format --check src tests fuzz scripts
	$(VENV)/bin/mypy

test: setup data tools lint
	$(PY) -m pytest -q --durations=25

# The security figures (docs/security.md): tamper campaign (1,000 trials per artifact), key broker
# under 200 concurrent clients for 30 s, SIGKILL crash tests, serve under abuse (unauthenticated bodies, slow
# drip, connection flood: memory and threads against the enclave's), then the atheris fuzzers for FUZZ_SECONDS in
# total. Every part runs even if an earlier one fails; reports in fuzz/out/. When all pass, the reports are kept
# in docs/security-data/ and docs/security.md's figures are rewritten from them.
FUZZ_SECONDS ?= 600
fuzz: setup data
	$(PY) -m pip install --quiet --disable-pip-version-check 'atheris>=2.3'
	@mkdir -p fuzz/out; status=0; \
	$(PY) fuzz/campaign.py --trials 1000 --json fuzz/out/campaign.json || status=1; \
	$(PY) fuzz/load.py --concurrency 200 --seconds 30 --json fuzz/out/load.json || status=1; \
	$(PY) fuzz/crashes.py --kills 20 --restarts 3 --json fuzz/out/crashes.json || status=1; \
	$(PY) fuzz/serve_abuse.py --json fuzz/out/serve-abuse.json || status=1; \
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS) --json fuzz/out/fuzz-report.json || status=1; \
	if [ $$status = 0 ]; then $(PY) fuzz/report.py fuzz/out --update docs/security.md; \
	else $(PY) fuzz/report.py fuzz/out; fi; \
	exit $$status

bench: setup data
	$(BT) bench --json runs/bench.json

clean:
	rm -rf $(VENV) .enclave-env build src/*.egg-info .pytest_cache .hypothesis
