# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian package: Fashion-MNIST for the offline demo and data tests.
APT_PACKAGES := dataset-fashion-mnist

.PHONY: setup system-deps demo test
setup: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,tensorboard,export]"
	touch $@

system-deps:
	@if ! [ -d /usr/share/datasets/fashion-mnist ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null \
	  || echo "warning: could not install $(APT_PACKAGES); the demo falls back to the Hub"; \
	fi

demo: setup
	$(PY) scripts/demo.py

# Two processes, each test file in one of them (its module fixtures built once).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile
