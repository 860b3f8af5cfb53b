"""Print ``name==floor`` for the dependencies CI tests at their floor, read from pyproject.toml's lower bounds."""

import re
import sys
import tomllib
from pathlib import Path

FLOOR_TESTED = ("transformers", "trl", "peft", "accelerate")  # torch: 2.13.0 CPU, the one CPU build on the CI disk

dependencies = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"][
    "dependencies"
]
for name in FLOOR_TESTED:
    spec = next((d for d in dependencies if re.match(rf"{name}\s*[<>=!~]", d)), None)
    floor = re.search(r">=\s*([0-9][0-9.]*)", spec or "")
    if floor is None:
        sys.exit(f"pyproject.toml gives {name} no '>=' floor: {spec!r}")
    print(f"{name}=={floor.group(1)}")
