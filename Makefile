# Two commands set everything up on a fresh machine:
#   make lab    create .venv, install, check the dataset, run the notebooks
#   make test   the same set-up, then the linter and the whole test suite (unit tests + notebooks under nbval)
# and one for quick work: make test-fast (everything but the notebook, subprocess, torchrun and heaviest tests).
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PARAMS      ?=
PYTEST_ARGS ?=
LAB_ARGS    ?=
# what make setup installs, with either installer
INSTALL     := -c constraints.txt -e ".[notebooks,test]"

.PHONY: lab test test-fast lint setup data clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# uv installs the same pinned packages about twice as fast as pip (it downloads, unpacks and compiles
	@# in parallel), from the sources pip is configured with (scripts/pip_sources.py). pip does the
	@# install where uv cannot be had or fails.
	@$(PY) -m pip install --quiet uv >/dev/null 2>&1 || echo "uv could not be installed: pip installs instead"
	@echo 'installing $(INSTALL)   (torch is large: a minute or two)'
	@# the installers say nothing while they unpack torch: a line every 20 s says the install goes on
	@# (the install runs in the background, where a shell ignores Ctrl-C: the trap stops it too)
	@( if [ -x $(VENV)/bin/uv ]; then \
	     $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode --index-strategy unsafe-best-match \
	       $$($(PY) scripts/pip_sources.py) $(INSTALL) \
	     || { echo "uv failed: pip installs instead"; $(PY) -m pip install --quiet $(INSTALL); }; \
	   else $(PY) -m pip install --quiet $(INSTALL); fi ) & pid=$$!; s=0; \
	trap 'kill $$(pgrep -P $$pid) $$pid 2>/dev/null; exit 130' INT TERM; \
	while kill -0 $$pid 2>/dev/null; do sleep 1; s=$$((s + 1)); \
	  if [ $$((s % 20)) -eq 0 ] && kill -0 $$pid 2>/dev/null; then echo "  still installing ($$s s)"; fi; done; \
	wait $$pid
	touch $@

data: setup
	@$(PY) -m sslab datasets --ensure fashion-mnist

lab: data
	$(PY) -m sslab.lab $(if $(PARAMS),--params $(PARAMS)) $(LAB_ARGS)

lint: setup
	$(PY) -m ruff check sslab benchmarks tests scripts

test: data lint
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: data lint
	$(PY) -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

clean-outputs:
	rm -rf outputs
