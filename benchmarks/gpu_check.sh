#!/usr/bin/env bash
# The GPU checks as one script, for a machine with a CUDA GPU (the device run of this project):
# the GPU-marked tests (flash-attn path, bf16) and the GPU benchmark. Results go to ${OUT:-gpu-results}/.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'flash_attn', bool(u.find_spec('flash_attn')))" | tee "$out/env.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.txt"
python benchmarks/bench_s2_gpu.py --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.txt"
