# Two entry points: `make demo` and `make test`. Both set everything up from a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test bench-quick clean

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

# The annotation page is tested in a real headless browser: Debian's chromium and its driver (selenium
# then downloads nothing). Installed when apt is there and we may; otherwise that one test is skipped.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null) \
	      || echo "could not install chromium-driver: the browser test will be skipped"; \
	  else echo "chromium-driver not installed (needs apt as root): the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest tests

bench-quick: $(STAMP)
	$(PY) benchmarks/supervised.py --quick
	$(PY) benchmarks/attribution.py --quick

clean:
	rm -rf $(VENV) runs
