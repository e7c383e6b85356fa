# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
VLLM   := $(VENV)/.vllm-installed

.PHONY: demo test lint typecheck ci install redis clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the local CPU build; a looser range pulls several GB of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The vLLM engine tests run vLLM's CPU build, which needs exactly this torch (and holds
# transformers < 5.20, numpy < 2.4). The torchvision, torchaudio and torchcodec it pulls from
# PyPI are CUDA builds that break `import vllm`; a text model needs none of them.
$(VLLM): $(STAMP)
	$(PIP) install -q "torch==2.13.0" -e ".[dev,vllm]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM)

# The Redis tests use a real redis-server; install it when it is missing (Debian package).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/kvtier demo

test: $(VLLM) redis
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

ci: test lint typecheck

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
