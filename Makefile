# Both targets work on a fresh machine: they create .venv, install torch (pinned to the CPU
# build when no torch is importable), install phivision, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phivision-installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/phivision demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
