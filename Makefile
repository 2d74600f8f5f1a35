VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-fast lab-down bench

setup:
	@VENV=$(VENV) ./scripts/setup.sh

## make demo: set everything up, start the lab, run a planned failover with approval
demo: setup
	opsflow lab demo

## make test: the whole suite (workflow logic, the lab's real parts, crash, replay)
test: setup
	pytest -q -p no:cacheprovider

## make test-fast: workflow logic only (time-skipping server), seconds
test-fast: setup
	pytest -q -p no:cacheprovider tests/unit tests/workflow

lab-down:
	opsflow lab down

bench: setup
	python bench/failover.py
