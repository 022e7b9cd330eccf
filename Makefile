# One command to set up and run the demo, one to set up and run the tests.
# torch is installed first at the exact CPU build (2.13.0) so pip never pulls CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser dicomtools lint demo test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev,dask]"
	touch $@

install: $(VENV)/.installed

# The review-page tests drive Debian's headless Chromium; installed here when missing
# (needs root and apt; elsewhere those two tests skip and say why).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	  else echo "chromium/chromedriver missing and no root apt: the browser tests will be skipped"; fi; \
	fi

# The DICOM SEG tests validate every SEG they write with dciodvfy (Debian's dicom3tools);
# installed here when missing (needs root and apt; elsewhere those checks skip and say why).
dicomtools:
	@if ! command -v dciodvfy >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dicom3tools; \
	  else echo "dciodvfy missing and no root apt: the DICOM SEG validity checks will be skipped"; fi; \
	fi

demo: install
	$(BIN)/medseg demo --output demo-output

# Lint and format check (ruff, settings in pyproject.toml) before the tests: `ruff format .` fixes the format.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install browser dicomtools lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]  # exit 5: no test is marked slow right now

clean:
	rm -rf $(VENV) demo-output .pytest_cache
