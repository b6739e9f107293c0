# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv
venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[sample,test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/imagetune demo

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests
	$(VENV)/bin/ruff format --check pipeline jobs tests

test: lint
	.ci/chromium
	$(PY) -m pytest
