# The two commands of the README: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-hf demo bench clean

install: $(STAMP)

# torch first, pinned, so nothing later can pull a CUDA build; then the rest.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

# HF transformers' own model test mixins run on OpenMoE (tests/hf_suite): their files come from the
# pinned transformers sdist (PyPI), extracted once into .cache/transformers-tests (the sdist lacks
# HF's empty tests/__init__.py, which their config tests load: it is created).
HF_VERSION := $(shell $(PYTHON) -c "import re; print(re.search(r'transformers==([^\s]+)', open('requirements.txt').read()).group(1))")
HF_TESTS := .cache/transformers-tests
test-hf: $(STAMP)
	@test -d $(HF_TESTS)/tests || { rm -rf $(HF_TESTS).tmp && mkdir -p $(HF_TESTS).tmp && \
	  $(PY) -m pip download -q --no-deps --no-binary :all: transformers==$(HF_VERSION) -d $(HF_TESTS).tmp && \
	  tar -xzf $(HF_TESTS).tmp/transformers-$(HF_VERSION).tar.gz -C $(HF_TESTS).tmp transformers-$(HF_VERSION)/tests && \
	  touch $(HF_TESTS).tmp/transformers-$(HF_VERSION)/tests/__init__.py && \
	  mkdir -p $(HF_TESTS) && mv $(HF_TESTS).tmp/transformers-$(HF_VERSION)/tests $(HF_TESTS)/tests && \
	  rm -rf $(HF_TESTS).tmp; }
	HF_HUB_OFFLINE=1 OPENMOE_HF_TESTS=$(HF_TESTS)/tests $(PY) -m pytest -q -p no:cacheprovider tests/hf_suite

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m openmoe.demo --out out/demo

bench: $(STAMP)
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) out
