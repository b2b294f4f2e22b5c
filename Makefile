# `make demo` and `make test` do all set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cxrdx-installed
# The torch builds this project is tested with; any torch>=2.4 works: make TORCH="torch torchvision" test
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test browser dicomtools clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Headless Chromium for the browser test (Debian package); the test skips with a reason without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will skip"; \
	  else echo "chromium not installed: browser test will skip"; fi; }

# DICOM encoders and validator for the DICOM tests (Debian packages: dcmtk, OpenJPEG's tools,
# dicom3tools); each test skips with a reason without its tool.
dicomtools:
	@command -v dcmcjpeg >/dev/null 2>&1 && command -v opj_compress >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq dcmtk libopenjp2-tools dicom3tools >/dev/null) || echo "DICOM tools not installed: their tests will skip"; \
	  else echo "DICOM tools not installed: their tests will skip"; fi; }

# demo-out/ is the demo's own folder: each run starts it afresh.
demo: $(STAMP)
	rm -rf demo-out
	$(VENV)/bin/cxrdx demo --out demo-out

# Lint, format check and type check first: they take seconds and point at the line.
test: $(STAMP) browser dicomtools
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out runs .pytest_cache .ruff_cache .mypy_cache
