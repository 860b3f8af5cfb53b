"""Peak memory of one LongLoRA training step on CPU, measured against longlora_plugin.memory.estimate_step_memory.

Each case runs alone in a fresh subprocess: a Llama (hidden 1024, 2 layers, 32k vocabulary, fp32) wrapped with
LongLoRA (LoRA r=8 on q/k/v/o, embeddings and norms trainable), AdamW; the "bytes-" cases use a 259-token vocabulary, so
that the layers' terms are not hidden under the loss head. One warm-up step at 64 tokens creates the
optimizer state; then the peak resident set (VmHWM, reset through /proc/self/clear_refs) of one step at N tokens
(forward, backward, optimizer step) is read, less the process's size before the model was built.
The loss is TRL's fused, chunked LM head (what SFTTrainer computes) or, for "hf-loss", the model's own loss over
full logits.

    python benchmarks/bench_memory.py --measured runs/measured.jsonl --plot docs/memory-cpu.png
        # the table in docs/memory.md: hours on 2 shared cores (a 32k-vocabulary step at 8192 tokens takes ~8 min);
        # --measured keeps each result, so an interrupted run resumes; cases predicted above --limit-gib are skipped
    python benchmarks/bench_memory.py --lengths 2048 4096 --cases s2 sdpa --plot /tmp/m.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {  # name -> (attention, checkpointing, loss, tiled_mlp shards, vocabulary)
    "hf-default": ("sdpa", False, "hf", None, 32000),
    "sdpa": ("sdpa", True, "fused", None, 32000),
    "s2": ("s2_attention", True, "fused", None, 32000),
    "s2-no-ckpt": ("s2_attention", False, "fused", None, 32000),
    "s2-hf-loss": ("s2_attention", True, "hf", None, 32000),
    "s2-tiled-mlp": ("s2_attention", True, "fused", 8, 32000),
    # a byte vocabulary: the loss head shrinks and the layers' terms (checkpoints, recompute, tiling) show
    "bytes-s2": ("s2_attention", True, "fused", None, 259),
    "bytes-s2-no-ckpt": ("s2_attention", False, "fused", None, 259),
    "bytes-s2-tiled-mlp": ("s2_attention", True, "fused", 8, 259),
}
MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=16)
LORA = dict(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
LIMIT_GIB = 7.5  # cases the model predicts above this are not run (the machine is shared)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(case: str, seq_len: int) -> None:
    """Run in a fresh process: print the measured peak of one training step, in bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl.trainer.utils import add_fused_lm_head

    from longlora_plugin import LongLoraConfig, get_longlora_model
    from longlora_plugin.memory import MemorySection, apply_memory_options

    attention, checkpointing, loss, shards, vocab = CASES[case]
    start = _rss_bytes("VmRSS")
    config = LlamaConfig(**{**MODEL, "vocab_size": vocab}, max_position_embeddings=seq_len, s2_group_size_ratio=0.25)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).train()
    apply_memory_options(model, MemorySection(tiled_mlp=shards))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    lora = LongLoraConfig.for_model(model, r=LORA["r"], lora_alpha=16, lora_dropout=0.0,
                                    target_modules=list(LORA["target_modules"]))
    model = get_longlora_model(model, lora)
    if attention != "s2_attention":
        model.get_base_model().set_attn_implementation(attention)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(length: int) -> None:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
        if loss == "fused":
            out = model(input_ids=ids, labels=ids, use_cache=False, fused_lm_head=True)
        else:
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(64)  # optimizer state exists from here on, as in every step after the first
    ready = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step(seq_len)
    peak = _rss_bytes("VmHWM")
    print(json.dumps({"peak_bytes": peak - start, "ready_bytes": ready - start}))


def measure(case: str, seq_len: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        # a fixed mmap threshold: large tensors are mapped and unmapped, so the resident set follows the allocations
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    code = f"from benchmarks.bench_memory import child; child({case!r}, {seq_len})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} at {seq_len}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(case: str, seq_len: int) -> dict:
    from transformers import LlamaConfig

    from longlora_plugin.memory import estimate_step_memory

    attention, checkpointing, loss, shards, vocab = CASES[case]
    return estimate_step_memory(
        LlamaConfig(**{**MODEL, "vocab_size": vocab}), seq_len, dtype="float32", lora_r=LORA["r"], lora_targets=LORA["target_modules"],
        attention="s2" if attention == "s2_attention" else "sdpa", gradient_checkpointing=checkpointing,
        tiled_mlp=shards, loss=loss, device="cpu",
    )


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | attention | checkpointing | loss | tiled MLP | vocab | N | measured GiB | predicted GiB | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted((r for r in rows if r["measured_gib"] is not None), key=lambda r: (list(CASES).index(r["case"]), r["N"])):
        attention, checkpointing, loss, shards, vocab = CASES[row["case"]]
        lines.append(f"| {row['case']} | {'S2' if attention == 's2_attention' else 'SDPA'} | {'yes' if checkpointing else 'no'} "
                     f"| {'TRL fused' if loss == 'fused' else 'full logits'} | {shards or '-'} | {vocab} | {row['N']} "
                     f"| {row['measured_gib']:.2f} | {row['predicted_gib']:.2f} | {row['error']:+.1%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, case in enumerate(dict.fromkeys(r["case"] for r in rows)):
        mine = sorted((r for r in rows if r["case"] == case), key=lambda r: r["N"])
        color = f"C{index}"
        measured = [r for r in mine if r["measured_gib"] is not None]
        ax.plot([r["N"] for r in measured], [r["measured_gib"] for r in measured], "o-", color=color, label=case)
        ax.plot([r["N"] for r in mine], [r["predicted_gib"] for r in mine], "x--", color=color, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("peak memory of one step (GiB)")
    ax.set_title("One LongLoRA step on CPU, fp32, hidden 1024, 2 layers, 32k vocabulary (bytes-: 259)\n"
                 "measured (o, solid) and estimate_step_memory (x, dashed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PROJECTED = {  # the published configs' shapes (config.json of meta-llama/Llama-2-7b-hf and Llama-3.1-8B)
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
}


def projections() -> str:
    """A markdown table: the longest sequence one step fits, per model, precision, device and setup."""
    from transformers import LlamaConfig

    from longlora_plugin.memory import DEVICE_MEMORY, SETUPS, longest_fitting

    lines = ["| model | base | device | " + " | ".join(SETUPS) + " |", "| --- | --- | --- |" + " --- |" * len(SETUPS)]
    for name, shape in PROJECTED.items():
        config = LlamaConfig(**shape)
        for bits, label in ((None, "bf16 + LoRA"), (4, "NF4 + LoRA (QLoRA)")):
            for device, capacity in DEVICE_MEMORY.items():
                longest = [longest_fitting(config, capacity, setup, quantization_bits=bits) for setup in SETUPS]
                lines.append(f"| {name} | {label} | {device} | " + " | ".join(f"{n // 1024}k" for n in longest) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument("--markdown", help="write the measured rows as a markdown table here")
    parser.add_argument("--limit-gib", type=float, default=LIMIT_GIB)
    parser.add_argument("--project", action="store_true", help="print only the GPU projections table")
    parser.add_argument("--measured", help="a JSON-lines file of earlier measurements ({case, N, peak_bytes} per "
                        "line): the cases it holds are not measured again, new ones are appended to it")
    args = parser.parse_args()
    if args.project:
        print(projections())
        return
    cached = {}
    if args.measured and Path(args.measured).is_file():
        for line in Path(args.measured).read_text().splitlines():
            record = json.loads(line)
            if "peak_bytes" in record:
                cached[(record["case"], record["N"])] = record
    rows = []
    print(f"{'case':14s} {'N':>6s} {'measured':>9s} {'predicted':>9s} {'error':>7s}  terms (GiB)", flush=True)
    for seq_len in args.lengths:
        for case in args.cases:
            estimate = predict(case, seq_len)
            predicted = estimate.total / 2**30
            measured = None
            if (case, seq_len) in cached:
                measured = cached[(case, seq_len)]["peak_bytes"] / 2**30
            elif predicted <= args.limit_gib:
                record = measure(case, seq_len)
                measured = record["peak_bytes"] / 2**30
                if args.measured:
                    with open(args.measured, "a") as f:
                        f.write(json.dumps({"case": case, "N": seq_len, **record}) + "\n")
            error = None if measured is None else (predicted - measured) / measured
            terms = {k: round(v / 2**30, 3) for k, v in estimate.terms.items()}
            rows.append({"case": case, "N": seq_len, "measured_gib": measured, "predicted_gib": round(predicted, 3),
                         "error": error, "terms": terms})
            shown = "skipped" if measured is None else f"{measured:8.2f}G"
            err = "" if error is None else f"{error:+7.1%}"
            print(f"{case:14s} {seq_len:6d} {shown:>9s} {predicted:8.2f}G {err:>7s}  {json.dumps(terms)}", flush=True)
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    if errors:
        print(f"largest |error|: {max(errors):.1%} over {len(errors)} measured cases")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
