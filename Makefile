# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.torch-reformer-installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# The built-in default: the duplication task with a small LSH model. runs/demo belongs to the demo
# and is started afresh each time (train into your own --out folder to keep runs).
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/reformer train --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

bench: $(STAMP)
	$(VENV)/bin/reformer bench memory speed quality

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
