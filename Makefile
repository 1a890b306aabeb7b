# make serve:     set up, export the model if needed, serve it on CPU (MODEL=DIR: a checkpoint saved here).
# make demo:      offline: a tiny random-weight checker exported, served, and checked and scanned on a few
#                 photographs in examples/ (its decisions mean nothing; it shows the commands at work).
# make test:      set up and run the test suite but the install checks (what CI runs, after make lint).
# make test-fast: the tests that start no tritonserver and are not slow (under a minute).
# make install-check: the tests that install the packages into fresh virtual environments (the client alone,
#                 docker-compose's export job): minutes of pip, so not part of make test; CI runs both.
# make deploy-check: the KServe manifests, validated and their runtime arguments served.
# make lint:      ruff (lint and format check) and vermin (served code runs on Python 3.10).
# make style:     let ruff fix and format what it can.
# make bench:     diffusers vs onnxruntime vs the served checker (perf_analyzer), full size (~80 min on 2 cores);
#                 BENCH_ARGS="--rows triton,images" measures a subset (python -m bench --help).
# make bench-docs: copy bench-results/ (results, perf_analyzer CSV) into docs/, draw the plot and write
#                 docs/benchmarks.md's figures from them (python -m bench.figures; the tests check they agree).
# make overload:  64 clients sending 32-image requests in three bursts: memory, refusals, latency (~6 min).
# make soak:      ten minutes at saturation, concept reloads, one stub kill (not part of make test).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= CompVis/stable-diffusion-safety-checker
REPOSITORY ?= build/repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# The export records which MODEL it wrote here; a different MODEL re-exports.
STAMP := $(REPOSITORY)/.exported-from
# perf_analyzer's own prefix (bench/perf.py finds it there).
PERF_ANALYZER := .perf-analyzer

# What Triton's Python backend runs (the served package, and the client's contract, strictness rule and
# preprocessing, which it imports), and the health probe the NGC 24.10 container runs: its Python is 3.10.
SERVED_PYTHON := model_repository served/safety_checker_served client/safety_checker_client/preprocess.py \
	client/safety_checker_client/spec.py client/safety_checker_client/strictness.py
# The pinned wheels the Python models' environments are built from (requirements/served.txt), for the NGC
# 24.10 image's Python 3.10 and this venv's Python: the export builds them offline (export/environment.py).
WHEELHOUSE := .wheelhouse
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

SOAK_MINUTES ?= 10
# make test runs the test files on this many pytest-xdist workers (one file per worker at a time): the tests
# wait on servers and subprocesses as much as they compute, so three keep two cores busy.
TEST_WORKERS ?= 3

.PHONY: setup repository serve demo test test-fast install-check deploy-check lint style bench bench-docs overload soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/dev.txt requirements/export.txt requirements/perf-analyzer.txt \
		requirements/served.txt client/pyproject.toml scan/pyproject.toml dropin/pyproject.toml \
		served/pyproject.toml admin/pyproject.toml gateway/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps --ignore-installed --prefix $(PERF_ANALYZER) -r requirements/perf-analyzer.txt
	for version in 3.10 $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); do \
		$(PY) -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version $$version \
			$(WHEEL_PLATFORMS) -r requirements/served.txt -d $(WHEELHOUSE) || exit 1; \
	done
	touch $@

repository: setup
	@if [ "$$(cat '$(STAMP)' 2>/dev/null)" = "$(MODEL)" ]; then \
		echo "$(REPOSITORY) already holds $(MODEL) (delete it to export again)"; \
	else \
		$(PY) -m export --model "$(MODEL)" --repository "$(REPOSITORY)" && echo "$(MODEL)" > "$(STAMP)"; \
	fi

# The ports are checked first, so that a conflict is reported at once rather than after the export.
SERVE_ARGS = --repository "$(REPOSITORY)" --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)
serve: setup
	@$(VENV)/bin/safety-checker serve --check-ports $(SERVE_ARGS)
	@$(MAKE) --no-print-directory repository
	$(VENV)/bin/safety-checker serve $(SERVE_ARGS)

# The tiny random-weight checker exported, served on free ports, and checked and scanned on a few photographs
# written into examples/: offline, and the server stops when the demo ends (python -m demo --help).
demo: setup
	$(PY) -m demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not install"

install-check: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m install

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not server and not slow"

# The KServe manifests: schemas, the runtime's own arguments served, the admin API, two replicas.
deploy-check: setup
	$(PY) -m pytest tests/test_deploy_manifests.py tests/test_deploy_runtime.py tests/test_deploy_openshift.py \
		tests/test_environment.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/vermin --no-tips --violations --target=3.10- --eval-annotations $(SERVED_PYTHON)

style: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench --output bench-results $(BENCH_ARGS)

bench-docs: setup
	$(PY) -m bench.figures --from bench-results

overload: setup
	$(PY) -m bench.overload --output bench-results

soak: setup
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --output bench-results

clean:
	rm -rf build
