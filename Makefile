# The two commands of the README's quick start. Each sets up whatever is
# missing first (scripts/setup.sh: .venv, PyTorch, the app), so both work on a
# fresh machine and are cheap to repeat.
.PHONY: setup run test

# The venv's tools (flwr, afl-flwr, pytest, ...) first, as an activated venv.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/.venv
DATA_DIR ?= ../shared/data/mnist

setup:
	@scripts/setup.sh

# The main job: 10 simulated clients, asynchronous, MNIST (offline files).
run: setup
	afl-flwr run --run-config "data-dir='$(DATA_DIR)'"

# The whole check, the same one CI runs.
test: setup
	ruff check . && mypy afl_flwr && pytest
