# make serve: set up, export the model if needed, serve it on CPU.
# make test:  set up and run the whole test suite.
# make bench: diffusers vs onnxruntime vs the served checker, full size (~12 min on 2 cores).

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

.PHONY: setup repository serve test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/dev.txt requirements/export.txt client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements/dev.txt
	touch $@

repository: setup
	@if [ "$$(cat '$(STAMP)' 2>/dev/null)" = "$(MODEL)" ]; then \
		echo "$(REPOSITORY) already holds $(MODEL) (delete it to export again)"; \
	else \
		$(PY) -m export --model "$(MODEL)" --repository "$(REPOSITORY)" && echo "$(MODEL)" > "$(STAMP)"; \
	fi

serve: repository
	$(VENV)/bin/safety-checker serve --repository "$(REPOSITORY)" \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench --output bench-results

clean:
	rm -rf build
