# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use: torch first (the pinned CPU wheel; an unpinned torch
# would pull gigabytes of CUDA packages), then this package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-training bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,api,hf]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/dataflowmm demo --out demo_output

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The shapes-world recipes trained from scratch (minutes): run after changing one.
test-training: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m training

bench: $(BIN)/.installed
	for b in framework_overhead export object_store text_to_image captioning augmentation image_editing api_image_generation difference_captions visual_qa dedup; do HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) demo_output .pytest_cache
