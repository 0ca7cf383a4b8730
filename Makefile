# The two commands of the README: `make demo` (the main job on the bundled sample data) and `make test`.
# Both create or reuse the project venv in .venv and install the project into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested versions (`make lock` writes them from the venv): constraints for every install.
LOCK := requirements/lock.txt
DEV_LOCK := requirements/lock-dev.txt
DEMO_DIR ?= out/demo
PYTEST_ARGS ?=

.PHONY: install test demo clean-demo cluster-smoke lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(LOCK) $(DEV_LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --progress-bar off -c $(LOCK) -c $(DEV_LOCK) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, torchvision, open_clip, prefect, ray, webdataset, pycocotools" \
		|| { echo "install failed: see pip output above"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) scripts/demo.sh

# The cluster path on this machine (root): PostgreSQL-backed Prefect, Ray head + 2 worker nodes, SeaweedFS (S3),
# the deployments of prefect.yaml on a process worker; docs/orchestration.md "Scaling out".
cluster-smoke: $(STAMP)
	BIN=$(BIN) scripts/cluster_smoke.sh

# Rewrite requirements/lock*.txt from the venv after adding or upgrading a dependency (install it first).
lock: | $(BIN)/python
	$(BIN)/python scripts/lock_requirements.py
