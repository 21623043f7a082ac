# The two commands of the README: `make demo` and `make test`. Both set up what is missing first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench bench-report proto clean

setup:
	@scripts/bootstrap.sh

demo: setup
	$(PY) -m moefleet.cli up
	$(PY) -m moefleet.cli demo; rc=$$?; $(PY) -m moefleet.cli down; exit $$rc

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# `make bench` runs every benchmarks/bench_*.py (each writes benchmarks/results/<name>.json), then regenerates
# benchmarks/RESULTS.md. `make bench BENCH=sim` (or BENCH="planner sim") runs some; BENCH_ARGS are passed to each
# script (e.g. --quick); BENCH_WRAP prefixes each command (e.g. "flock /tmp/moefleet-heavy.lock").
BENCH ?= $(patsubst benchmarks/bench_%.py,%,$(wildcard benchmarks/bench_*.py))
BENCH_ARGS ?=
BENCH_WRAP ?=

bench: setup
	@for b in $(BENCH); do \
	  echo "== benchmarks/bench_$$b.py $(BENCH_ARGS)"; \
	  $(BENCH_WRAP) $(PY) benchmarks/bench_$$b.py $(BENCH_ARGS) || $(PY) benchmarks/report.py --failed $$b --reason "exit $$?"; \
	done
	$(PY) benchmarks/report.py

bench-report:
	$(PY) benchmarks/report.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
