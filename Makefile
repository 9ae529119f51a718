# The two commands of README.md. Each does all its own set-up on a fresh
# machine that has Python 3.11+, Java 17+ and Maven: a virtualenv with the
# pinned dependencies, the Kafka broker jars, and a broker on loopback.
# The first of these that is 3.11+ (python3 may be older where python3.11 was
# added beside it); set PYTHON=... to choose.
ifndef PYTHON
PYTHON := $(or $(firstword $(foreach p,python3 python3.14 python3.13 python3.12 python3.11,$(shell $(p) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(p)))),python3)
endif
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo install lint bench bench-memory check-alerts clean

# The venv is made again when it has no pip (one that ensurepip failed, as
# Debian's python3 without python3-venv leaves it), or is not $(PYTHON)'s
# version (PYTHON=... given later; its interpreter upgraded away).
VERSION_OF = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifneq ($(call VERSION_OF,$(BIN)/python),$(call VERSION_OF,$(PYTHON)))
OTHER_PYTHON := other-python
endif
ifneq ($(call VERSION_OF,.venv-bench/bin/python),$(call VERSION_OF,$(PYTHON)))
OTHER_BENCH_PYTHON := other-python
endif
.PHONY: other-python
other-python:

$(STAMP): pyproject.toml constraints.txt $(OTHER_PYTHON)
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required: $(PYTHON) is older; run with PYTHON=/path/to/python3.11 or newer"; exit 1; }
	test -x $(BIN)/pip && test "$(call VERSION_OF,$(BIN)/python)" = "$(call VERSION_OF,$(PYTHON))" || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)
	$(BIN)/python tools/kafka_broker.py fetch >/dev/null

lint: install
	$(BIN)/ruff check stream_app tests tools bench
	$(BIN)/mypy --strict stream_app

# pytest exits 5 when it collects no test; make treats that as the failure it is.
# --require-integration (tests/conftest.py) fails a run that has no test
# against the real broker, which the broker-free tests alone would pass.
test: lint
	$(BIN)/pytest --require-integration

demo: install
	$(BIN)/python tools/demo.py

# Quix Streams (the contender of bench/pipeline_bench.py) runs from its own
# virtualenv: it needs pydantic < 2.14, which constraints.txt pins higher.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS  ?=

# Made again as the project's venv is (above): its interpreter gone or upgraded.
$(BENCH_STAMP): bench/requirements-quix.txt $(OTHER_BENCH_PYTHON)
	test -x $(BENCH_VENV)/bin/pip && test "$(call VERSION_OF,$(BENCH_VENV)/bin/python)" = "$(call VERSION_OF,$(PYTHON))" || { rm -rf $(BENCH_VENV); $(PYTHON) -m venv $(BENCH_VENV); }
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements-quix.txt
	touch $@

# About 6 minutes on the 2-core machine; BENCH_ARGS="--sessions 20000" for a
# quick one. The last line is `ratio stream-app-eos/quix-eos: R`.
bench: install $(BENCH_STAMP)
	$(BIN)/python bench/domain_bench.py
	$(BIN)/python bench/pipeline_bench.py --latency --latency-control $(BENCH_ARGS)

# 1M sessions stored, served, then restored onto an empty disk: peak RSS and
# restore rate (about 4 minutes). MEMORY_ARGS="--sessions 100000" for less.
MEMORY_ARGS ?=
bench-memory: install
	$(BIN)/python bench/memory_bench.py $(MEMORY_ARGS)

# The alerting rules under Prometheus' own promtool (built once with Go, ~5
# minutes): too slow for `make test`, which checks them offline.
check-alerts: install
	$(BIN)/python tools/check_alerts.py

# A broker started by hand as the README says (--workdir var/kafka) is
# stopped first: deleting its state file left it running, unfindable.
clean:
	-$(PYTHON) tools/kafka_broker.py stop --workdir var/kafka
	rm -rf $(VENV) $(BENCH_VENV) var .pytest_cache .mypy_cache .ruff_cache
