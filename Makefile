# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing, install torch (the CPU wheel pip finds on this
# machine's disk) and the package with its dev extras, and make sure Fashion-MNIST is there.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BT     := $(VENV)/bin/branchy-tee
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: all setup data demo test fuzz bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP)

data:
	@scripts/ensure-fashion-mnist.sh

# Until the end-to-end demo lands: the model zoo, then a short LeNet-5 training on Fashion-MNIST
# (synthetic data when it is absent) with distillation, calibration and a per-exit evaluation.
DEMO_DATA := $(if $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz),fashion-mnist,synthetic --synthetic-channels 1 --synthetic-size 28)
demo: setup data
	$(BT) models
	$(BT) train --net lenet5 --dataset $(DEMO_DATA) --epochs 2 --lr 0.003 --num-workers 0 --out runs/demo
	$(BT) eval runs/demo --plot runs/demo/accuracy_vs_cost.png

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(BT) bench --json bench.json

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
