# rtcontrast: the two commands a newcomer needs are `make run` and `make test`.
PY := .venv/bin/python

.PHONY: run test test-full setup setup-test check-config bench train export evaluate install test-reliability test-reliability-full mutate

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

## Set up and run the node on its embedded defaults (local spool, SQLite, shipped model, CPU if no GPU).
run: setup
	$(PY) node.py run

## Set up and run the test suite (the same command CI runs). Slow suites: `make test-full`.
test: setup-test
	$(PY) -m pytest -m "not slow" -q

test-full: setup-test
	$(PY) -m pytest -q

check-config: setup
	$(PY) node.py check-config

train: setup-test
	$(PY) -m rtcontrast.research.train --config config/train_default.yaml
	$(PY) -m rtcontrast.research.train --config config/train_default_continue.yaml

export: setup-test
	$(PY) export_onnx.py var/train/default2/best.pt --out models/qmap-pelvis.onnx

evaluate: setup-test
	$(PY) -m rtcontrast.research.evaluate --model models/qmap-pelvis.onnx

## Install as a systemd service into /opt/rtcontrast and /etc/rtcontrast (root; see docs/admin.md).
install:
	bash scripts/install.sh

## Benchmarks against the peers (bench/README.md): prints the tables, writes bench/results/*.json.
bench: setup-test
	$(PY) bench/receive.py
	$(PY) bench/inference.py
	$(PY) bench/e2e.py
	$(PY) bench/memory.py

## Reliability suites (crash, outage, load, bad input): CI form, and the full form (RTC_FULL=1, ~30 min).
test-reliability: setup-test
	$(PY) -m pytest tests/reliability -q

test-reliability-full: setup-test
	RTC_FULL=1 $(PY) -m pytest tests/reliability -q -s

## Mutation testing of the clinical modules with mutmut (docs/testing.md); not part of CI: the
## whole set (~4400 mutants) needs hours on 2 cores.  MUTATE_BUDGET_S bounds the run (what is
## not reached is reported "not checked"); MUTANTS narrows it (fnmatch patterns of mutant names).
MUTMUT := .venv/bin/mutmut
MUTATE_BUDGET_S ?= 3600
MUTATE_CHILDREN ?= 2
MUTANTS ?= rtcontrast.core.physics.* rtcontrast.core.render.* rtcontrast.core.maps.* rtcontrast.core.contract.* \
	rtcontrast.core.inference.xǁQMapModelǁpredict* rtcontrast.node.qa.* rtcontrast.dicom.uids.* \
	rtcontrast.dicom.map_series.* rtcontrast.node.dispatch.outbox.* rtcontrast.dicom.volume.* \
	rtcontrast.dicom.derive.* rtcontrast.node.receive.spool.* rtcontrast.node.store.jobs.*
mutate: setup-test
	env -u PYTHONPATH timeout $(MUTATE_BUDGET_S) nice -n 10 $(MUTMUT) run --max-children $(MUTATE_CHILDREN) $(MUTANTS) || true
	env -u PYTHONPATH $(PY) tests/mutation/score.py --fail-under 85 $(MUTANTS)
