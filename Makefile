# The README's two commands are `make demo` and `make test`; both set up from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The constraints file pins torch to the local CPU wheel; PIP_CONSTRAINT reaches build isolation too.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test lint demo sample-data bench clean monai-label-env

$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,pacs]"  # the tests use real PACS servers
	touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check medssl_monai tests bench

test: venv lint
	$(PY) -m pytest -q -ra --durations=30

sample-data: venv
	$(PY) -m medssl_monai.sample_data sample_data

demo: venv
	$(PY) -m medssl_monai.demo

bench: venv
	$(PY) bench/bench_index.py

# MONAI Label 0.8.5 in its own venv (about 6 minutes once; seconds when it is there): scripts/monai_label_env.sh.
# MEDSSL_MONAILABEL_VENV puts it elsewhere (a cache outside the clone); tests/test_monai_label.py looks there too.
MONAILABEL_VENV ?= $(or $(MEDSSL_MONAILABEL_VENV),.monailabel-venv)
monai-label-env:
	PYTHON=$(PYTHON) scripts/monai_label_env.sh $(MONAILABEL_VENV)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
