#!/usr/bin/env bash
# Manual check (not CI): the newest torch that pip may install next to us, here 2.14.1 from PyPI (a large CUDA build
# that also runs on CPU: about 4 GB of wheels, 10 GB free disk wanted), with our package and the newest transformers,
# trl, peft and accelerate, running the floor set of tests. Usage: benchmarks/torch_latest_check.sh [TORCH_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${1:-2.14.1}

free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 10 ]; then
    echo "torch $torch_version needs about 10 GB of free disk here; $free_gb GB free" >&2
    exit 1
fi
venv=${VENV:-$(mktemp -d)/torch-$torch_version}
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""

pip install -q "torch==$torch_version"
pip install -q -e . pytest hypothesis
python .ci/versions.py "torch $torch_version"
pytest -q -p no:cacheprovider tests/test_s2_ops.py tests/test_layout.py tests/test_model_families.py \
    tests/test_longlora_config.py tests/test_adapter_roundtrip.py tests/test_rope.py tests/test_trl.py \
    tests/test_compat.py tests/test_install.py
