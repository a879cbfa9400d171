# Each target sets up the virtual environment it needs, so a fresh clone runs either command.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/default
PYTEST_ARGS ?=

.PHONY: install train test clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -c constraints.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python -m experiments.pretrain --workdir=$(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs .pytest_cache
