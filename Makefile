# make run      - create .venv from the lock, start the service on the bundled model (127.0.0.1:8000)
# make test     - install everything the tests need (locked pip packages + Debian packages), lint, run the suite
# make lock     - re-resolve requirements/*.txt after editing pyproject.toml's dependencies
# make upgrade  - the newest releases pyproject.toml allows, into the locks, then the whole suite
# make image-test - build the CPU image offline and run it as docker-compose.cpu.yml does (docker/test-image.sh)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
DEBIAN_PACKAGES := dataset-fashion-mnist prometheus hey docker-compose shellcheck

# The torch build of the virtual environment: CUDA on a host with an NVIDIA driver, else CPU.
TORCH_BUILD ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
LOCK := requirements/test-$(TORCH_BUILD).txt
# Where uv finds torch's CPU wheels (not on PyPI); these machines carry them on disk.
TORCH_CPU_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),/opt/wheels,https://download.pytorch.org/whl/torch/)
# Every lock is for CPython 3.11 on Linux x86_64 (the image's); the project's build backend is locked too.
UV_COMPILE = printf 'setuptools>=68\n' | $(VENV)/bin/uv pip compile pyproject.toml - --quiet --generate-hashes \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: run test lint venv system-packages lock upgrade image-test bench summary evaluate

$(VENV)/.installed: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r $(LOCK)
	$(PIP) --no-deps --no-build-isolation -e .
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

test: venv system-packages lint
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# Keeps every locked version that still satisfies pyproject.toml; UPGRADE=--upgrade takes the newest instead.
lock: venv
	$(UV_COMPILE) $(UPGRADE) --find-links $(TORCH_CPU_WHEELS) -o requirements/service-cpu.txt
	$(UV_COMPILE) $(UPGRADE) -o requirements/service-cuda.txt
	$(UV_COMPILE) $(UPGRADE) --extra test --find-links $(TORCH_CPU_WHEELS) -o requirements/test-cpu.txt
	$(UV_COMPILE) $(UPGRADE) --extra test -o requirements/test-cuda.txt

upgrade:
	$(MAKE) lock UPGRADE=--upgrade
	rm -rf $(VENV)  # a fresh environment from the new locks: nothing left over from the old
	$(MAKE) test

# As root, with a Debian mirror for the base image (once) and pip's indexes for the wheels (once per lock).
image-test: venv
	$(MAKE) system-packages DEBIAN_PACKAGES="$(DEBIAN_PACKAGES) docker.io debootstrap curl"
	PYTHON=$(PY) docker/test-image.sh

bench: venv system-packages
	$(PY) -m benchmarks.run --mode all

summary: venv
	$(PY) -m igcv2.summary

evaluate: venv system-packages
	$(PY) -m igcv2.evaluate model_store/igcv2-fashion/1 --dataset fashion-mnist --split test
