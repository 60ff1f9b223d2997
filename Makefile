# Two commands for a new user: `make demo` and `make test`. Each installs what it needs into .venv once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: test test-integration demo install data clean bench-gpu

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]' $(TORCH)
	touch $@

# Fashion-MNIST and Chromium with its driver (the report's and the review app's browser checks) come from Debian's
# packages; skipped politely where apt is not available or we are not root.
data:
	@if [ -f $(FMNIST) ]; then echo "fashion-mnist: present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		|| echo "fashion-mnist: apt-get failed; tests that need it will be skipped"; \
	else echo "fashion-mnist: apt-get not available (or not root); tests that need it will be skipped"; fi
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then echo "chromium: present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) \
		|| echo "chromium: apt-get failed; the report's browser checks will be skipped"; \
	else echo "chromium: apt-get not available (or not root); the report's browser checks will be skipped"; fi

test: $(STAMP) data
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) -m pytest -q

# A real local Prefect server (loopback, temporary PREFECT_HOME): deploys infra/prefect.yaml, starts a process
# worker, runs the scheduled sanitize deployment, then stops everything (about 2 minutes).
test-integration: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false DEDE_INTEGRATION=1 $(PY) -m pytest -q tests/integration

# The whole pipeline on real images: builds (once) a backdoored encoder, sanitizes a poisoned Fashion-MNIST corpus.
demo: $(STAMP) data
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/dede demo

# The GPU figures in one short unattended run on a CUDA machine (under 8 minutes; never part of `make test`): the
# gpu-marked tests, then the throughput bench on CUDA at 32 and 224 px, rows with the device's name written to
# docs/results/throughput.md. Exits 2 without CUDA.
bench-gpu: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) -m bench.gpu_check --out docs/results

clean:
	rm -rf $(VENV) .pytest_cache
