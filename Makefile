# drivedit: `make demo` and `make test` are the two commands a newcomer needs.
# Both install into .venv (created here when no virtual environment is active).
SHELL := /bin/bash
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.drivedit-installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest tests -q --timeout=900 -p no:cacheprovider

demo: install
	$(PY) jobs/demo.py

bench: install
	$(PY) bench/sampling.py
	$(PY) bench/encode.py
	$(PY) bench/finetune_step.py
	$(PY) bench/finetune_scaling.py
	$(PY) bench/generate.py
	$(PY) bench/serve.py
	$(PY) bench/methods_fid.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
