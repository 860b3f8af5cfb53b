"""`longlora demo` for several training seeds: is the result robust, and does each run fit its 10 minutes?

Each seed runs the demo exactly as a user does (`longlora demo --seed S`) in its own process, so wall times are the
user's. The table gives passkey accuracy per length for the extended model, the base beyond its context, the step
the held-out selection kept, and the wall time.

    python benchmarks/demo_seeds.py                       # seeds 0 1 2, about 25 minutes on 2 cores
    python benchmarks/demo_seeds.py --seeds 3 4 --out runs/demo-seeds
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

GOAL, BASE_CEILING, MINUTES = 0.9, 0.1, 10.0


def run_seed(seed: int, out: Path) -> dict:
    output_dir = out / f"seed-{seed}"
    command = [sys.executable, "-m", "longlora_plugin.cli", "demo", "--seed", str(seed), "--output-dir", str(output_dir)]
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / f"seed-{seed}.log").write_text(finished.stdout + finished.stderr)
    if finished.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {finished.returncode}); see {out / f'seed-{seed}.log'}")
    result = json.loads((output_dir / "passkey.json").read_text())
    kept = re.search(r"kept the weights of step (\d+)", finished.stdout)
    return {
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "selected_step": int(kept.group(1)) if kept else None,
        "lengths": result["lengths"],
        "accuracy": result["accuracy"],
    }


def accuracy_of(row: dict, model: str) -> dict[str, float]:
    """Length -> accuracy of the demo's model whose label starts with ``model`` ("LongLoRA", "base")."""
    return next(by_length for label, by_length in row["accuracy"].items() if label.startswith(model))


def base_beyond_context(row: dict) -> float:
    return max(v for n, v in accuracy_of(row, "base").items() if int(n) > row["lengths"][0])


def table(rows: list[dict]) -> str:
    lengths = rows[0]["lengths"]
    lines = [
        "| seed | " + " | ".join(f"LongLoRA @{n}" for n in lengths) + " | base beyond its context (max) | kept step | wall |",
        "| --- |" + " --- |" * (len(lengths) + 3),
    ]
    for row in rows:
        extended = accuracy_of(row, "LongLoRA")
        lines.append(
            f"| {row['seed']} | " + " | ".join(f"{100 * extended[str(n)]:.0f}%" for n in lengths)
            + f" | {100 * base_beyond_context(row):.0f}% | {row['selected_step']} | {row['wall_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo-seeds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, out))
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    target = str(rows[0]["lengths"][-1])
    held = all(accuracy_of(r, "LongLoRA")[target] >= GOAL for r in rows)
    fast = all(r["wall_seconds"] <= MINUTES * 60 for r in rows)
    base_low = all(base_beyond_context(r) <= BASE_CEILING for r in rows)
    print(f"goal >= {GOAL:.0%} at {target} for every seed: {'held' if held else 'NOT held'}; base <= "
          f"{BASE_CEILING:.0%} beyond its context: {'yes' if base_low else 'no'}; every run <= {MINUTES:g} min: "
          f"{'yes' if fast else 'no'}")


if __name__ == "__main__":
    main()
