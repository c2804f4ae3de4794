# Two commands set everything up on a fresh machine:
#   make lab    create .venv, install, check the dataset, run the five notebooks
#   make test   the same set-up, then the whole test suite (unit tests + notebooks under nbval)
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PARAMS      ?=
PYTEST_ARGS ?=
LAB_ARGS    ?=

.PHONY: lab test setup data clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[notebooks,test]"
	touch $@

data: setup
	@$(PY) -m sslab datasets --ensure fashion-mnist

lab: data
	$(PY) -m sslab.lab $(if $(PARAMS),--params $(PARAMS)) $(LAB_ARGS)

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

clean-outputs:
	rm -rf outputs
