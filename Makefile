# make run   - create .venv, install, start the service on the bundled model (127.0.0.1:8000)
# make test  - install everything the tests need (pip + Debian packages), then run the suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := dataset-fashion-mnist prometheus hey docker-compose

.PHONY: run test lint venv system-packages bench summary evaluate

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

venv: $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: venv
	$(PY) -m service

test: venv system-packages
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: venv system-packages
	$(PY) -m benchmarks.run --mode all

summary: venv
	$(PY) -m igcv2.summary

evaluate: venv system-packages
	$(PY) -m igcv2.evaluate model_store/igcv2-fashion/1 --dataset fashion-mnist --split test
