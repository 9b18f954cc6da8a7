# `make test` and `make quickstart` create .venv on first use and install the package with its test extras.
# On CPU machines the constraints pin the CPU torch build that this project's machines carry.
VENV ?= .venv
PYTHON = $(VENV)/bin/python
PIP = $(PYTHON) -m pip install -q -c .ci/constraints.txt

$(VENV)/.installed: setup.cfg pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PIP) -e ".[test]"
	$(PIP) --no-build-isolation natten
	touch $@

.PHONY: test quickstart
test: $(VENV)/.installed
	$(PYTHON) -m pytest

quickstart: $(VENV)/.installed
	$(PYTHON) train.py --config configs/quickstart_digits.json --name quickstart --end-step 2000 \
		--batch-size 128 --demo-every 1000 --save-every 1000 --sample-n 100 --num-workers 0
	$(PYTHON) sample.py --checkpoint runs/quickstart --n 64 --grid --out-dir runs/quickstart/samples
