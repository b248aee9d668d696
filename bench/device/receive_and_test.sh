#!/usr/bin/env bash
# Device call 1 of 2 (bench/device/README.md): install the carried wheels, keep the first part of the
# default model's GGUF and the WikiText-2 files in /tmp for call 2, and run the CUDA tests (tests/test_cuda.py).
set -u
mkdir -p /tmp/xfer && cp .xfer/part-a /tmp/xfer/ && cp -r .xfer/data /tmp/xfer/data || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .xfer/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import sys, torch, transformers, gguf; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'gguf', gguf.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/env.txt"
lscpu | grep -m1 'Model name' | tee -a "$OUT/env.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT/cuda-tests.log" | tail -30
