"""What the auto-registration hook costs a Python start that never imports transformers.

Times ``python -c pass`` with the hook on (default) and off (LONGLORA_AUTOREGISTER=0), interleaved, and reads the
hook module's own import time from ``python -X importtime``.

    python benchmarks/bench_startup.py --runs 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def start_time(env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    on = {k: v for k, v in os.environ.items() if k != "LONGLORA_AUTOREGISTER"}
    off = {**on, "LONGLORA_AUTOREGISTER": "0"}
    times = {"on": [], "off": []}
    for _ in range(args.runs):
        times["on"].append(start_time(on))
        times["off"].append(start_time(off))
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=on, capture_output=True, text=True)
    own = [line for line in trace.stderr.splitlines() if "longlora_plugin_autoload" in line]
    median_on, median_off = statistics.median(times["on"]) * 1e3, statistics.median(times["off"]) * 1e3
    print(f"python -c pass, median of {args.runs}: hook on {median_on:.2f} ms, hook off {median_off:.2f} ms, "
          f"difference {median_on - median_off:+.2f} ms")
    print("import time of the hook module (-X importtime, self/cumulative us):", *own or ["not imported"], sep="\n  ")


if __name__ == "__main__":
    main()
