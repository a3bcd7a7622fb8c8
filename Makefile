# Two entry points: `make demo` and `make test`. Both set everything up from a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench-quick clean

setup: $(STAMP)

# torch/torchvision pinned to the releases on this machine's disk (plain pip finds them locally);
# elsewhere any recent torch works, the package itself does not cap it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/frugalseg demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests

bench-quick: $(STAMP)
	$(PY) benchmarks/supervised.py --quick
	$(PY) benchmarks/attribution.py --quick

clean:
	rm -rf $(VENV) runs
