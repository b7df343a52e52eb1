# The two commands a new user needs: `make run` (the main experiment) and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test test-all lint format speech example-data clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed  ## Main job: AV-Digits, pretrain each encoder, then fuse (override with ARGS="...")
	$(PY) -m experiments.train $(ARGS)

test: $(VENV)/.installed  ## Default test suite (slow tests excluded)
	$(PY) -m pytest -q -n auto $(ARGS)

test-all: $(VENV)/.installed  ## Every test, including the slow ones
	$(PY) -m pytest -q -n auto -m "" $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

speech: $(VENV)/.installed  ## Regenerate the committed speech asset (needs espeak-ng)
	$(PY) -m data.make_avdigits_speech

EXAMPLE_DATA ?= outputs/avdigits_files

example-data: $(VENV)/.installed  ## AV-Digits as image/audio files + manifest.csv (for data=manifest)
	$(PY) -m data.export_avdigits $(EXAMPLE_DATA) --overwrite $(ARGS)

clean-venv:
	rm -rf $(VENV)
