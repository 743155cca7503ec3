# The two commands of the README: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-hf test-lm-eval demo bench clean

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

# lm-evaluation-harness on an exported folder (tests/test_lm_eval.py). lm-eval pulls ~35 packages, so
# it lives in its own venv layered over $(VENV) (a .pth adds $(VENV)'s site-packages after its own):
# torch and transformers are shared, nothing is installed into $(VENV).
EVAL_VENV := .venv-eval
LM_EVAL := lm-eval==0.4.13
test-lm-eval: $(STAMP)
	@test -f $(EVAL_VENV)/.installed || { rm -rf $(EVAL_VENV) && $(PYTHON) -m venv $(EVAL_VENV) && \
	  $(EVAL_VENV)/bin/python -c "import site; print('$(abspath $(VENV))/lib/python%d.%d/site-packages' % __import__('sys').version_info[:2])" \
	    > "$$($(EVAL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/openmoe-base-venv.pth" && \
	  $(EVAL_VENV)/bin/python -m pip install -q "$(LM_EVAL)" && touch $(EVAL_VENV)/.installed; }
	HF_HUB_OFFLINE=1 $(EVAL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_lm_eval.py

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m openmoe.demo --out out/demo

bench: $(STAMP)
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) $(EVAL_VENV) out
