# Two commands on a fresh machine: `make demo` (set up + the main job) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA packages.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

data:
	@if [ -n "$$DYNATTACK_DATA" ] || [ -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing; run: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
		echo "(or set DYNATTACK_DATA to a directory holding the four Fashion-MNIST IDX .gz files)"; exit 1; \
	fi

setup: $(STAMP) data

demo: setup
	$(VENV)/bin/dynattack demo

test: setup
	$(PY) -m pytest
