# The two commands of README.md. Each does all its own set-up on a fresh
# machine that has Python 3.11+, Java 17+ and Maven: a virtualenv with the
# pinned dependencies, the Kafka broker jars, and a broker on loopback.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo install lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)
	$(BIN)/python tools/kafka_broker.py fetch >/dev/null

lint: install
	$(BIN)/ruff check stream_app tests tools bench
	$(BIN)/mypy --strict stream_app

# pytest exits 5 when it collects no test; make treats that as the failure it is.
test: lint
	$(BIN)/pytest

demo: install
	$(BIN)/python tools/demo.py

bench: install
	$(BIN)/python bench/domain_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
