# Two commands for a new user: `make demo` runs the end-to-end story, `make test` the suite.
VENV   := .venv
STAMP  := $(VENV)/.devtrust-installed
BIN    := $(VENV)/bin

.PHONY: demo test lint install clean
.DEFAULT_GOAL := demo

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check trustcore
	$(BIN)/mypy trustcore signers hq factory_station registrar device_sim broker_config

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
