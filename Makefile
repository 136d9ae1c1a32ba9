# depthsite: `make run` starts the site on the embedded defaults, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install migrate run test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# The local site: DJANGO_DEBUG is off by default (debug pages show settings and tracebacks); `make run`
# turns it on unless set, which also serves static files and keeps a generated key in var/secret_key.
migrate run: export DJANGO_DEBUG ?= 1

migrate: install
	$(PY) manage.py migrate --noinput

run: migrate
	$(PY) manage.py collectstatic --noinput -v0
	scripts/run.sh

# Production on one machine (gunicorn + qcluster, depthsite.settings.production): see docs/deploy.md.
.PHONY: serve
serve: install
	scripts/serve.sh all

# One pytest-xdist worker per core (at most 4: each may hold a large network), a test file per worker, the longest
# files handed out first (tests/conftest.py, LONGEST_FILES); the ten slowest tests are listed at the end.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_PARALLEL = -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=10
# pytest keeps its assertion-rewritten test modules as .pyc files; where PYTHONDONTWRITEBYTECODE is set it
# rewrites all 361 again in every worker of every run (collection 13 s instead of 7 s per worker here).
PYTEST = PYTHONDONTWRITEBYTECODE= $(PY) -m pytest

test: install
	$(PYTEST) $(PYTEST_PARALLEL)

test-fast: install
	$(PYTEST) $(PYTEST_PARALLEL) -m "not slow"

bench: install
	$(PY) bench/load.py
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) var .pytest_cache
