# The two commands a learner needs: `sudo make lab` and `sudo make test`.
PY := .venv/bin/python

.PHONY: setup setup-test lab test test-unit test-lab bench down clean

setup:
	@scripts/bootstrap.sh

setup-test:
	@scripts/bootstrap.sh --test

## Set up, then bring up the default lab (bookinfo + curl + sleep on two nodes).
lab: setup
	@$(PY) -m lab

## Set up, then run the whole suite: unit, TUI and lab tiers.
test: setup-test
	@$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup-test
	@$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/tui

test-lab: setup-test
	@$(PY) -m pytest -q -p no:cacheprovider tests/lab

bench: setup-test
	@$(PY) bench/bench_up_down.py

down:
	@$(PY) -m lab down --all

clean: down
	rm -rf .venv
