# Two entry points for a newcomer: `make demo` and `make test` (lint + the suite). Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test bench mutate mutate-known clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a CPU wheel here; unpinned it drags in gigabytes of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) browser

# Chromium and its driver, from the distribution, for the page test (tests/serve/test_page.py).
# Installed with apt as root when missing; elsewhere the test is skipped (and fails under CI).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver; \
	else echo "note: chromium/chromedriver missing and not root: install them to run tests/serve/test_page.py"; fi

demo: $(STAMP)
	rm -rf demo-run  # the demo's own output folder: start fresh every time
	$(VENV)/bin/router demo demo-run

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	bash bench/run

# Mutation testing (not part of `make test` or CI): see README "Development".
mutate: $(STAMP)
	$(PY) bench/mutate.py run $(MUTATE_ARGS)

mutate-known: $(STAMP)
	$(PY) bench/mutate.py known --runs 3

clean:
	rm -rf $(VENV) demo-run
