# The two commands: `make demo` runs the main job on the bundled default; `make test` passes the tests.
# Both set up .venv from nothing (pinned requirements-dev.txt, the package and its extension).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow venv clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh csrc/cpu/*.cpp csrc/cpu/*.h) gpt2_fast/build_ext.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gpt2_fast demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) build *.egg-info
