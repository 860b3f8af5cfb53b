"""Print the versions a CI set ran with: ``python .ci/versions.py NAME``."""

import platform
import sys
from importlib.metadata import version

names = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
print(f"versions ({sys.argv[1]}): python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names))
