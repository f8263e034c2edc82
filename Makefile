# make run  : install into .venv and run the main job on the embedded default
# make test : install into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# test processes side by side (pytest-xdist), one torch thread each; TEST_WORKERS=0 runs the suite in this process
TEST_WORKERS ?= 2

.PHONY: install run test data clean

$(STAMP): pyproject.toml Makefile scripts/install.sh
	# the same install the docker images run (docker/), with the test extras
	sh scripts/install.sh $(VENV) dev
	# the Compose specification's JSON schema: tests validate infra/compose with it where docker compose is absent
	$(PY) scripts/compose_schema.py $(VENV)/share/compose-spec.json
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
