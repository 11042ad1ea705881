# structvi: `make demo` and `make test` each set up .venv (CPU torch) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench readme docs clean venv

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m structvi.cli demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e '.[test,bench]'
	$(PY) -m structvi.cli bench

readme: $(VENV)/.installed
	$(PY) -m structvi.cli readme

docs: $(VENV)/.installed
	$(PY) docs/make_figures.py
	$(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info
