#!/usr/bin/env bash
# The GPU check in one call, for the GPU machine as it is (python3, torch + CUDA, transformers, peft, accelerate,
# pytest; no trl, datasets, deepspeed or flash-attn needed). Run from the repository root:
#     bash benchmarks/gpu_check.sh             # results under ${OUT:-./gpu-results}
#     bash benchmarks/gpu_check.sh --dry-run   # CPU rehearsal with tiny shapes (or LONGLORA_DRY_RUN=1)
# Exits non-zero when a GPU test fails or is skipped, or when a GPU path that should have run did not.
set -euo pipefail
export PYTHONPATH=.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
dry=${LONGLORA_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && dry=1
export LONGLORA_DRY_RUN=$dry
out=${OUT:-./gpu-results}
mkdir -p "$out"
start=$(date +%s)

echo "== versions"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "(no nvidia-smi)" > "$out/nvidia-smi.txt"
python3 - <<'PY' | tee "$out/versions.txt"
import importlib.util, platform, torch, transformers
from longlora_plugin.ops import flash_attn_available, torch_varlen_available
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "| transformers", transformers.__version__)
for name in ("peft", "accelerate", "pytest", "trl", "datasets", "deepspeed", "flash_attn"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
print("  flash_attn_varlen_func imports:", flash_attn_available(), "| torch varlen_attn:", torch_varlen_available())
if torch.cuda.is_available():
    print("  gpu:", torch.cuda.get_device_name())
PY

echo "== GPU-marked tests (files that need only torch + transformers)"
tests_status=0
python3 -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$out/gpu-tests.xml" \
    tests/test_s2_ops.py tests/test_kernel_backends.py 2>&1 | tee "$out/gpu-tests.txt" || tests_status=$?
python3 - "$out/gpu-tests.xml" "$dry" <<'PY' || tests_status=1
import sys, xml.etree.ElementTree as ET
path, dry = sys.argv[1], sys.argv[2] == "1"
cases = list(ET.parse(path).getroot().iter("testcase"))
def state(case):
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            return tag, (node.get("message") or "")[:200]
    return "passed", ""
results = [(c.get("name"), *state(c)) for c in cases]
for name, st, msg in results:
    print(f"  {st:8s} {name} {msg}")
bad = [r for r in results if r[1] in ("failure", "error")]
# Without flash-attn its tests may skip; every other GPU test must run on the GPU machine.
unexpected_skips = [r for r in results if r[1] == "skipped" and "flash" not in r[0]]
if dry:
    print(f"  dry run: {len(unexpected_skips)} skips expected on CPU")
    unexpected_skips = []
if not any(r[1] == "passed" and "varlen" in r[0] for r in results) and not dry:
    bad.append(("no varlen GPU test passed", "", ""))
for r in bad + unexpected_skips:
    print("  GPU TEST NOT PASSED:", r[0], r[1], r[2])
sys.exit(1 if bad or unexpected_skips else 0)
PY

echo "== benchmark: paths, kernel (S2 vs full), 7B-slice step"
bench_status=0
args=()
[[ "$dry" == "1" ]] && args+=(--dry-run)
python3 benchmarks/bench_s2_gpu.py --out "$out" "${args[@]}" 2>&1 | tee "$out/gpu-bench.txt" || bench_status=$?

echo "== done in $(( $(date +%s) - start )) s: tests status $tests_status, benchmark status $bench_status; results in $out"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]]
