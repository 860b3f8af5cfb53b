"""The ``longlora`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, seq_len=args.seq_len, speed_lengths=tuple(args.speed_lengths))
    return 0


def _info(args: argparse.Namespace) -> int:
    import importlib.metadata
    import os

    from transformers import AttentionInterface

    from .attention import S2_ATTENTION
    from .plugins import get_plugin_manager, installed_plugins

    registered = S2_ATTENTION in AttentionInterface().valid_keys()
    print(f"attention implementation: {S2_ATTENTION} (registered: {'yes' if registered else 'no'})")
    autoload = os.environ.get("LONGLORA_AUTOREGISTER", "1")
    print(f"auto-registration on transformers import: {'off' if autoload.lower() in ('0', 'false', 'no', 'off') else 'on'}"
          " (LONGLORA_AUTOREGISTER)")
    print("model families:")
    for families in get_plugin_manager().hook.longlora_model_families():
        for family in families:
            print(f"  {family.model_type:12s} {family.s2_attention:16s} {family.notes}")
    plugins = installed_plugins()
    print("installed plugins:" + ("" if plugins else " none"))
    for plugin in plugins:
        print(f"  {plugin['name']} ({plugin['distribution']} {plugin['version']})")
    print("versions:")
    for package in ("longlora-plugin", "torch", "transformers", "peft", "trl", "accelerate", "pluggy", "datasets",
                    "flash-attn", "deepspeed"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {package} {version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlora", description="LongLoRA for the Hugging Face stack.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a tiny Llama with S2-Attn on CPU and time S2 against SDPA")
    demo.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    demo.add_argument("--seq-len", type=int, default=512, help="training length in tokens (default: 512)")
    demo.add_argument(
        "--speed-lengths", type=int, nargs="+", default=[4096, 8192], help="lengths to time one step at (default: 4096 8192)"
    )
    demo.set_defaults(run=_demo)
    info = commands.add_parser("info", help="show the attention name, model families, plugins and versions")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
