# spark-cluster: the two commands a newcomer needs are `make demo` and `make test`.
# Everything installs into .venv inside the checkout: nothing outside it is changed.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
STAMP := $(VENV)/.installed.stamp
# compiled bytecode (pytest's rewritten tests too) is kept under .venv, never beside the sources: each
# pytest worker and each `python -m spark_cluster` a test starts then skips compiling what has not changed
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache

.PHONY: install sim-deps check test test-unit test-contract test-scale test-long demo demo-down golden docs clean
SIM_PACKAGES := docker.io openssh-server mmdebstrap iproute2 iptables iputils-ping chromium prometheus prometheus-alertmanager

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

## Debian packages the simulated cluster, the status page's browser test and the monitoring tests (Prometheus, Alertmanager) need (root); quick when they are there
sim-deps:
	@if ! command -v dockerd >/dev/null || ! command -v sshd >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v iptables >/dev/null || ! command -v ping >/dev/null || ! command -v chromium >/dev/null || ! command -v promtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then \
	  echo "installing: $(SIM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SIM_PACKAGES) >/dev/null; \
	fi

## the whole suite, cluster tests included (what .ci/run runs): the tests that need neither the simulated
## cluster nor vLLM's parsers in 4 workers (they mostly wait on sockets), then those one at a time (they
## share one simulated cluster and the machine's two cores); both run, and it fails if either failed
UNSHARED := not cluster and not contract and not scale and not long
SHARED := (cluster or contract) and not scale and not long
test: install sim-deps
	status=0; \
	$(PYTHON) -m pytest -n 4 --dist worksteal --durations=10 -m "$(UNSHARED)" || status=1; \
	$(PYTHON) -m pytest --durations=30 -m "$(SHARED)" || status=1; \
	exit $$status

## the inner loop: lint and unit tests, no cluster, under a minute
check: install
	$(PYTHON) -m ruff check spark_cluster tests bench
	$(PYTHON) -m pytest -q -n 6 --dist worksteal --hypothesis-profile=check -m "not cluster and not contract and not fuzz and not browser and not monitoring"

## fast unit run: no simulated cluster, no vLLM releases
test-unit: install
	$(PYTHON) -m pytest -m "not cluster and not contract and not browser"

## four simulated nodes on both executors: one group of TP=2 x PP=2 (up, status, failover, down) and two groups of
## TP=2 (a hang in one, a rolling change); 10-25 minutes a test
test-scale: install sim-deps
	$(PYTHON) -m pytest -m scale -s

## the native executor's run of the longest two-node tests (a long step, a killed API server, a frozen rank
## against /health, a frozen worker under load through the gateway, the worker's cable pulled for a minute);
## their Ray run is in `make test`; about 15 minutes
test-long: install sim-deps
	$(PYTHON) -m pytest -m long

## the rendered flags against pinned vLLM releases' own parsers
test-contract: install
	$(PYTHON) -m pytest -m contract

## the main job on the built-in local simulated cluster (needs root); `make demo-down` removes it
demo: install sim-deps
	$(VENV)/bin/spark-cluster sim demo

demo-down: install
	-$(VENV)/bin/spark-cluster down configs/local-sim.yaml
	$(VENV)/bin/spark-cluster sim down

## regenerate golden plans after an intended change; review `git diff tests/golden`
golden: install
	UPDATE_GOLDEN=1 $(PYTHON) -m pytest -q tests/test_golden.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis build dist *.egg-info

## regenerate the configuration reference in docs/configuration.md
docs: install
	$(PYTHON) -c "import pathlib; from spark_cluster.reference import update_reference as u; p = pathlib.Path('docs/configuration.md'); p.write_text(u(p.read_text()))"
