"""The ``longlora`` command: it parses and calls. Each subcommand imports what it needs when it runs, so that
``longlora --help`` and ``longlora info`` do not load trl, peft or datasets."""

from __future__ import annotations

import argparse
import sys

from .sources import check_local_source

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    if args.quick:
        from .demos.quick import run_quick_demo

        run_quick_demo(steps=args.steps or 150, seq_len=args.seq_len, speed_lengths=tuple(args.speed_lengths or [4096, 8192]))
        return 0
    import datasets
    import transformers

    from .demos.passkey import run_passkey_demo

    datasets.disable_progress_bars()  # the demo prints its own progress; the bars would bury it
    transformers.utils.logging.disable_progress_bar()

    overrides = {"training.max_steps": args.steps} if args.steps is not None else {}
    if args.seed is not None:
        overrides.update({"training.seed": args.seed, "data.seed": args.seed})
    if args.output_dir:
        overrides["training.output_dir"] = args.output_dir
    run_passkey_demo(overrides=overrides, trials=args.trials, speed_lengths=tuple(args.speed_lengths or [8192]))
    return 0


def _info(args: argparse.Namespace) -> int:
    import importlib.metadata
    import os

    from transformers import AttentionInterface

    from .hf_attention import S2_ATTENTION
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


def _train(args: argparse.Namespace) -> int:
    from .train import run_recipe

    run_recipe([args.recipe, *args.overrides])
    return 0


def _merge(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from .adapter import load_longlora, merge_longlora, read_longlora_settings
    from .data import load_tokenizer

    check_local_source(args.base, "--base")
    check_local_source(args.adapter, "--adapter")
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype="auto")
    model = load_longlora(base, args.adapter)
    trained_on = read_longlora_settings(args.adapter).get("trained_on_quantized_base")
    tokenizer = None
    for source in (args.adapter, args.base):
        try:
            tokenizer = load_tokenizer(source)
            break
        except (OSError, ValueError):
            continue
    merge_longlora(model, args.output, tokenizer=tokenizer)
    precision = str(next(base.parameters()).dtype).removeprefix("torch.")
    print(f"merged onto the full-precision base {args.base} ({precision})"
          + (f"; the adapter was trained on its {trained_on.get('bnb_4bit_quant_type', '4-bit')} 4-bit quantization"
             if trained_on else ""))
    print(f"merged model written to {args.output}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from .memory import plan_report

    source = Path(args.config)
    if source.is_file():
        values = json.loads(source.read_text())
        config = AutoConfig.for_model(values.pop("model_type", "llama"), **values)
    else:  # a local folder, or a hub name already in the cache: no download, no weights
        try:
            config = AutoConfig.from_pretrained(args.config, local_files_only=True)
        except OSError:
            raise ValueError(f"no config.json at {args.config}: give a config file, a model folder, or a hub name "
                             "whose config is in the local cache") from None
    print(plan_report(config, args.length, args.memory_gib, dtype=args.dtype,
                      quantization_bits=4 if args.qlora else None, lora_r=args.lora_r))
    return 0


def _eval_passkey(args: argparse.Namespace) -> int:
    from .data.passkey import PASSKEY_INTRO
    from .data.tokenizer import text_encoder
    from .eval import passkey_grid, passkey_lengths, plot_passkey, plot_passkey_heatmap
    from .rope import extend_rope

    lengths = passkey_lengths(args.min_length, args.max_length, args.interval)  # before the model loads
    if args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    model, tokenizer = _load_model(args)
    if args.extend_to:  # beyond the trained length, with a larger interpolation factor, as the paper did
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        factor = extend_rope(base, args.extend_to)
        print(f"rope extended by a further x{factor:g} to {args.extend_to} tokens for evaluation")
    results, grid = passkey_grid(
        model,
        text_encoder(tokenizer),
        lengths,
        args.trials,
        depths=args.depths,
        seed=args.seed,
        intro="" if args.no_intro else PASSKEY_INTRO,
        progress=not args.quiet,
    )
    for length, accuracy in results.items():
        print(f"passkey @ {length:6d} tokens: {accuracy:.2%}")
    if args.output:
        _write_results(results, args.output, "passkey")
    if args.plot:
        label = args.adapter or args.model
        plot_passkey({label: results}, args.plot, trained_length=args.max_length, title="passkey retrieval")
        if args.depths > 1:
            plot_passkey_heatmap(grid, args.plot.removesuffix(".png") + "-depth.png", title=f"passkey retrieval: {label}")
    return 0


def _load_model(args: argparse.Namespace):
    from .eval import load_for_eval

    check_local_source(args.model, "--model")
    check_local_source(args.adapter, "--adapter")
    check_local_source(args.tokenizer, "--tokenizer")
    return load_for_eval(args.model, adapter=args.adapter, tokenizer=args.tokenizer)


def _write_results(results: dict, output: str, kind: str) -> None:
    import csv
    import json

    if output.endswith(".csv"):
        with open(output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["length", kind])
            writer.writerows(sorted(results.items()))
    else:
        with open(output, "w") as f:
            json.dump({kind: results}, f, indent=2)


def _eval_ppl(args: argparse.Namespace) -> int:
    from .data.formats import load_records
    from .eval import document_token_ids, perplexity_at_lengths, plot_perplexity

    if min(args.lengths) < 2 or args.stride < 1:
        raise ValueError(
            f"--lengths must all be at least 2 and --stride at least 1, got {args.lengths} and {args.stride}"
        )
    model, tokenizer = _load_model(args)
    records = load_records(args.data, split=args.split, max_records=args.max_records, sample_by=args.sample_by)
    documents = document_token_ids(records, tokenizer, args.text_field, max_tokens=args.max_tokens, source=args.data)
    results = perplexity_at_lengths(model, documents, args.lengths, args.stride, progress=not args.quiet)
    for length, value in results.items():
        print(f"perplexity @ {length:6d} tokens (stride {min(args.stride, length)}): {value:.4f}")
    if args.output:
        _write_results(results, args.output, "perplexity")
    if args.plot:
        plot_perplexity({args.adapter or args.model: results}, args.plot, title="sliding-window perplexity")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlora", description="LongLoRA for the Hugging Face stack.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="extend a tiny byte-level Llama 4x with LongLoRA on CPU and evaluate passkey retrieval (--quick: a one-minute "
        "S2-Attn training demo)",
    )
    demo.add_argument("--quick", action="store_true", help="train a tiny Llama with S2-Attn on stdlib bytes and time it")
    demo.add_argument("--passkey", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    demo.add_argument("--steps", type=int, help="training steps (default: the passkey recipe's, or 150 with --quick)")
    demo.add_argument("--seq-len", type=int, default=512, help="--quick: training length in tokens (default: 512)")
    demo.add_argument("--speed-lengths", type=int, nargs="*", help="lengths to time one training step at")
    demo.add_argument("--seed", type=int, help="training seed: LoRA init, sample generation and order (default: 0)")
    demo.add_argument("--trials", type=int, default=40, help="passkey trials per length (default: 40)")
    demo.add_argument("--output-dir", help="where the adapter, results and plot go (default: runs/demo)")
    demo.set_defaults(run=_demo)
    info = commands.add_parser("info", help="show the attention name, model families, plugins and versions")
    info.set_defaults(run=_info)

    train = commands.add_parser(
        "train", help="train from a recipe (YAML) with TRL's SFTTrainer", description="Overrides: --section.key value"
    )
    train.add_argument("recipe", help="path to a recipe YAML file")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs, e.g. --training.max_steps 10")
    train.set_defaults(run=_train)

    merge = commands.add_parser("merge", help="merge a LongLoRA adapter into its base and write a plain HF model")
    merge.add_argument("--base", required=True, help="base model: hub name or local folder")
    merge.add_argument("--adapter", required=True, help="adapter folder written by training (has longlora.json)")
    merge.add_argument("--output", required=True, help="folder for the merged model")
    merge.set_defaults(run=_merge)

    plan = commands.add_parser(
        "plan", help="estimate one training step's peak memory at a length, and the memory options that make it fit")
    plan.add_argument("config", help="a config.json file, a model folder, or a cached hub name (no weights are read)")
    plan.add_argument("--length", type=int, required=True, help="target sequence length in tokens")
    plan.add_argument("--memory-gib", type=float, default=79.6, help="device memory in GiB (default: 79.6, an 80 GB "
                      "H100; an H200 is 140.4)")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    plan.add_argument("--qlora", action="store_true", help="a 4-bit NF4 base (model.quantization)")
    plan.add_argument("--lora-r", type=int, default=8)
    plan.set_defaults(run=_plan)

    evaluate = commands.add_parser("eval", help="evaluate a base, adapter or merged model with full attention")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    passkey = tasks.add_parser("passkey", help="passkey retrieval, greedy exact match, at lengths on an interval")
    passkey.add_argument("--model", required=True, help="base or merged model (hub name or folder)")
    passkey.add_argument("--adapter", help="a LongLoRA adapter folder to load onto --model")
    passkey.add_argument("--tokenizer", help="tokenizer name or folder; 'bytes' for the byte tokenizer")
    passkey.add_argument("--min-length", type=int, default=1024)
    passkey.add_argument("--max-length", type=int, required=True)
    passkey.add_argument("--interval", type=int, default=1024)
    passkey.add_argument("--trials", type=int, default=20)
    passkey.add_argument("--seed", type=int, default=0)
    passkey.add_argument("--depths", type=int, default=0, help="N evenly spaced key depths (a depth x length heatmap); "
                         "default: a random depth per trial")
    passkey.add_argument("--extend-to", type=int, help="extend RoPE further to this length before evaluating")
    passkey.add_argument("--no-intro", action="store_true", help="leave out the paper's instruction before the filler")
    passkey.add_argument("--output", help="write results here (.json, or .csv)")
    passkey.add_argument("--plot", help="write a PNG plot here (and <name>-depth.png with --depths)")
    passkey.add_argument("--quiet", action="store_true", help="no progress bar")
    passkey.set_defaults(run=_eval_passkey)
    ppl = tasks.add_parser("ppl", help="sliding-window perplexity on long documents at several context lengths")
    ppl.add_argument("--model", required=True, help="base or merged model (hub name or folder)")
    ppl.add_argument("--adapter", help="a LongLoRA adapter folder to load onto --model")
    ppl.add_argument("--tokenizer", help="tokenizer name or folder; 'bytes' for the byte tokenizer")
    ppl.add_argument("--data", required=True, help="a .txt/.json/.jsonl/.parquet file or a hub dataset name")
    ppl.add_argument("--split", default="test")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--max-records", type=int, help="evaluate at most this many documents")
    ppl.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document",
                     help="a .txt file is one document (default), or one per paragraph or line")
    ppl.add_argument("--max-tokens", type=int, help="cut each document to this many tokens")
    ppl.add_argument("--lengths", type=int, nargs="+", required=True, help="evaluation context lengths")
    ppl.add_argument("--stride", type=int, default=256, help="sliding-window stride (default: 256, the paper's)")
    ppl.add_argument("--output", help="write results here (.json, or .csv)")
    ppl.add_argument("--plot", help="write a PNG plot of perplexity vs length here")
    ppl.add_argument("--quiet", action="store_true", help="no progress bar")
    ppl.set_defaults(run=_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # bad input (values, paths, hub ids): one line, no traceback
        if args.debug:
            raise
        parser.exit(2, f"longlora: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
