VENV ?= .venv
# Test modules run in parallel (pytest-xdist), each whole in one process but the crash suite's and other
# lab-per-test modules (tests/conftest.py SPREAD); labs take free ports, and most of a lab test is waiting
# (replication, heartbeats, restarts), so five processes keep 2 cores busy. JOBS=0: one process.
JOBS ?= 5
PYTEST = pytest -q -p no:cacheprovider -n $(JOBS) --dist loadscope --durations=15
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Cached bytecode, where the machine turns it off: pytest rewrites every test module's asserts in every process
# again without it (collection took 6.5 s of CPU per process, 3 s with the cache).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test test-fast lint lab-down bench

setup:
	@VENV=$(VENV) ./scripts/setup.sh

## make demo: set everything up, start the lab, run a planned failover with approval
demo: setup
	opsflow lab demo

## make test: lint (ruff, pyproject's [tool.ruff]), then the whole suite (workflow logic, the lab's real parts, crash, replay)
test: setup lint
	$(PYTEST)

## make test-fast: workflow logic only (time-skipping server), seconds
test-fast: setup lint
	$(PYTEST) tests/unit tests/workflow

lint: setup
	ruff check .

lab-down:
	opsflow lab down

bench: setup
	python bench/failover.py
