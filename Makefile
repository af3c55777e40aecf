# spark-cluster: the two commands a newcomer needs are `make demo` and `make test`.
# Everything installs into .venv inside the checkout: nothing outside it is changed.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
STAMP := $(VENV)/.installed.stamp
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install test test-unit demo golden docs clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

## the whole suite, cluster tests included (what .ci/run runs)
test: install
	$(PYTHON) -m pytest

## fast unit run: no simulated cluster
test-unit: install
	$(PYTHON) -m pytest -m "not cluster"

## the main job on the built-in example (until the simulated cluster lands: the plan of the card's setup)
demo: install
	$(VENV)/bin/spark-cluster plan configs/dgx-spark-2node.yaml

## regenerate golden plans after an intended change; review `git diff tests/golden`
golden: install
	UPDATE_GOLDEN=1 $(PYTHON) -m pytest -q tests/test_golden.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis build dist *.egg-info

## regenerate the configuration reference in README.md
docs: install
	$(PYTHON) -c "import pathlib; from spark_cluster.reference import update_readme as u; p = pathlib.Path('README.md'); p.write_text(u(p.read_text()))"
