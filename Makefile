# The two commands of the README: `make demo` and `make test`. Both set up what is missing first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench proto clean

setup:
	@scripts/bootstrap.sh

demo: setup
	$(PY) -m moefleet.cli up
	$(PY) -m moefleet.cli demo; rc=$$?; $(PY) -m moefleet.cli down; exit $$rc

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
