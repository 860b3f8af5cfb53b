"""The ``longlora`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, seq_len=args.seq_len, speed_lengths=tuple(args.speed_lengths))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
