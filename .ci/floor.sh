#!/usr/bin/env bash
# CI, second set: the floors of pyproject.toml (transformers, trl, peft, accelerate) with torch 2.13.0 CPU, in a
# fresh venv where torch is installed first, as in a user's environment. Checks that installing us keeps that torch,
# then runs a smaller but real set: S2 ops, model families, config and round trips, the TRL path.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t floors < <(python3 .ci/floors.py)
venv=$(mktemp -d)/floor
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1

echo "+ floor set: torch==2.13.0 ${floors[*]}"
pip install -q torch==2.13.0
pip install -q --dry-run --report "$venv/report.json" -e . "${floors[@]}" pytest hypothesis
python - "$venv/report.json" <<'PY'
import json, sys
names = sorted(item["metadata"]["name"].lower() for item in json.load(open(sys.argv[1]))["install"])
if "torch" in names:
    sys.exit(f"installing longlora-plugin would replace the installed torch: {names}")
print(f"torch kept: pip would install {len(names)} packages, torch not among them")
PY
pip install -q -e . "${floors[@]}" pytest hypothesis
python .ci/versions.py floor
pytest -q -p no:cacheprovider tests/test_s2_ops.py tests/test_layout.py tests/test_model_families.py \
    tests/test_longlora_config.py tests/test_adapter_roundtrip.py tests/test_rope.py tests/test_trl.py \
    tests/test_compat.py tests/test_install.py
