"""A small-scale reproduction of the LongLoRA paper's ablations on CPU.

Corpus: the Python standard library's own .py files (long documents that exist offline on every machine; the
corpus' size and SHA-256 are recorded). A tiny byte-level Llama is pretrained at 256 tokens with full attention, then
extended 4x to 1024 tokens with position interpolation in several ways, at equal steps and seeds:

  (a) full fine-tuning, full attention        (b) full fine-tuning, S2-Attn
  (c) LoRA on attention only, S2-Attn         (d) LongLoRA: LoRA + embeddings + norms, S2-Attn
  (e) position interpolation, no fine-tuning  (f) LoRA + embeddings + norms, short attention (no shift)
  plus the group size of (d): N/2, N/4 (= d), N/8; and the controls that explain the gap between (d) and (a):
  (g) (d) with full attention                 (h) (d) with llama3-style or yarn interpolation
  (i) (d) with more steps, to (a)'s wall time (b) without shift
  and, towards a recommendation for small models, (a) and (d) with llama3-style interpolation, G = N/2 and a
  training logit scale.

Every model is evaluated with full attention: sliding-window perplexity (stride 256) at 256, 512 and 1024 tokens on
held-out files. Each run is a fresh subprocess, so its training time and peak memory are its own.

    python benchmarks/reproduce_longlora.py --out runs/reproduction            # under 60 minutes on 2 cores
    python benchmarks/reproduce_longlora.py --out runs/reproduction --quick    # under 10 minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from longlora_plugin.data.tokenizer import BYTE_ID_OFFSET

ORIGINAL, TARGET = 256, 1024
BYTE_OFFSET = BYTE_ID_OFFSET
RUNS = {
    "a_full_ft_full_attn": dict(train="full", attention="sdpa"),
    "b_full_ft_s2": dict(train="full", attention="s2"),
    "c_lora_s2": dict(train="lora", attention="s2"),
    "d_longlora_s2": dict(train="lora+", attention="s2"),
    "e_pi_only": dict(train="none", attention="sdpa"),
    "f_longlora_no_shift": dict(train="lora+", attention="s2", shift=False),
    "d_group_n2": dict(train="lora+", attention="s2", group=TARGET // 2),
    "d_group_n8": dict(train="lora+", attention="s2", group=TARGET // 8),
    # Controls for the gap between (d) and (a):
    "g_longlora_full_attn": dict(train="lora+", attention="sdpa"),  # is S2-Attn the limit, or the low rank?
    "h_longlora_llama3": dict(train="lora+", attention="s2", rope="llama3"),  # does linear interpolation hurt?
    "h_longlora_yarn": dict(train="lora+", attention="s2", rope="yarn"),
    "i_longlora_same_time": dict(train="lora+", attention="s2", same_time_as="a_full_ft_full_attn"),  # more steps
    "b_full_ft_no_shift": dict(train="full", attention="s2", shift=False),  # the shift where capacity is not short
    # Towards a recommendation for small models: S2-Attn + LoRA+ with what the controls found to matter.
    "a_llama3": dict(train="full", attention="sdpa", rope="llama3"),  # (a) with the same interpolation
    "r_llama3_n2": dict(train="lora+", attention="s2", rope="llama3", group=TARGET // 2),
    "r_llama3_scale": dict(train="lora+", attention="s2", rope="llama3", logit_scale=0.75),
    "r_llama3_n2_scale": dict(train="lora+", attention="s2", rope="llama3", group=TARGET // 2, logit_scale=0.75),
}
SETTINGS = {
    "full": dict(pretrain_steps=1500, extend_steps=300, eval_docs=24),
    "quick": dict(pretrain_steps=250, extend_steps=40, eval_docs=4),
}
LEARNING_RATE = {"full": 3e-4, "lora": 2e-3, "lora+": 2e-3}  # per parameterisation, the same for every run of it


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path for path in sorted(root.glob("*.py")) if path.stat().st_size >= 4096]


def split_corpus() -> tuple[list[bytes], list[bytes], dict]:
    files = corpus_files()
    documents = [path.read_bytes() for path in files]
    digest = hashlib.sha256(b"".join(documents)).hexdigest()
    held_out = [doc for path, doc in zip(files, documents) if hashlib.sha256(path.name.encode()).digest()[0] < 26]
    train = [doc for path, doc in zip(files, documents) if hashlib.sha256(path.name.encode()).digest()[0] >= 26]
    info = {
        "corpus": f"{len(files)} .py files of {sysconfig.get_paths()['stdlib']} (>= 4 KiB)",
        "bytes": sum(map(len, documents)),
        "sha256": digest,
        "train_files": len(train),
        "held_out_files": len(held_out),
    }
    return train, held_out, info


def batches(documents: list[bytes], length: int, batch_size: int, seed: int):
    import torch

    stream = torch.frombuffer(bytearray(b"\n".join(documents)), dtype=torch.uint8).long() + BYTE_OFFSET
    rng = random.Random(seed)
    while True:
        starts = [rng.randrange(0, stream.numel() - length) for _ in range(batch_size)]
        yield torch.stack([stream[s : s + length] for s in starts])


def pretrain(out: Path, steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    train, _, _ = split_corpus()
    config = LlamaConfig(
        vocab_size=256 + BYTE_OFFSET, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=ORIGINAL, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    data = batches(train, ORIGINAL, 16, seed=0)
    for _ in range(steps):
        batch = next(data)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out / "base")


def run_one(out: Path, name: str, steps: int, eval_docs: int) -> dict:
    """One configuration, in its own process: extend, train, evaluate with full attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from longlora_plugin import LongLoraConfig, extend_rope, get_longlora_model
    from longlora_plugin.eval import perplexity_at_lengths

    spec = RUNS[name]
    train, held_out, _ = split_corpus()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    group = spec.get("group", TARGET // 4)
    rope = spec.get("rope", "linear")
    if spec["train"] in ("lora", "lora+"):
        config = LongLoraConfig.for_model(
            model, original_context=ORIGINAL, target_context=TARGET, s2_group_size=group, rope_type=rope,
            s2_shift=spec.get("shift", True), s2_logit_scale=spec.get("logit_scale", 1.0),
            trainable_embeddings=spec["train"] == "lora+",
            trainable_norms=spec["train"] == "lora+",
        )
        model = get_longlora_model(model, config)
        if spec["attention"] == "sdpa":
            model.get_base_model().set_attn_implementation("sdpa")
    else:
        extend_rope(model, TARGET, original_length=ORIGINAL, rope_type=rope)
        if spec["attention"] == "s2":
            from longlora_plugin import configure_s2

            configure_s2(model, group_size=group, shift=spec.get("shift", True))
            model.set_attn_implementation("s2_attention")
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    if spec["train"] != "none":
        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE[spec["train"]], weight_decay=0.0)
        data = batches(train, TARGET, 4, seed=1)
        model.train()
        for _ in range(steps):
            batch = next(data)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    documents = [[b + BYTE_OFFSET for b in doc[:4096]] for doc in held_out[:eval_docs]]
    perplexity = perplexity_at_lengths(model.eval(), documents, [ORIGINAL, 2 * ORIGINAL, TARGET], stride=256)
    return {
        "run": name, **spec, "rope": rope, "steps": steps if spec["train"] != "none" else 0,
        "group": group if spec["attention"] == "s2" else None,
        "trainable_params": sum(p.numel() for p in trainable) if spec["train"] != "none" else 0,
        "train_seconds": round(train_seconds, 1), "peak_rss_mib": round(peak_mib, 1),
        "perplexity": {str(k): round(v, 4) for k, v in perplexity.items()},
    }


LABELS = {
    "a_full_ft_full_attn": "(a) full fine-tuning, full attention",
    "b_full_ft_s2": "(b) full fine-tuning, S2-Attn",
    "c_lora_s2": "(c) LoRA (attention only), S2-Attn",
    "d_longlora_s2": "(d) LongLoRA: LoRA + embed + norm, S2-Attn, G=N/4",
    "e_pi_only": "(e) position interpolation, no fine-tuning",
    "f_longlora_no_shift": "(f) LoRA + embed + norm, short attention (no shift)",
    "d_group_n2": "(d) with G=N/2",
    "d_group_n8": "(d) with G=N/8",
    "g_longlora_full_attn": "(g) LoRA + embed + norm, full attention",
    "h_longlora_llama3": "(h) (d) with llama3-style interpolation",
    "h_longlora_yarn": "(h) (d) with yarn interpolation",
    "i_longlora_same_time": "(i) (d) with more steps, (a)'s training time",
    "b_full_ft_no_shift": "(b) without shift (short attention)",
    "a_llama3": "(a) with llama3-style interpolation",
    "r_llama3_n2": "(d) with llama3-style, G=N/2",
    "r_llama3_scale": "(d) with llama3-style, logit scale 0.75",
    "r_llama3_n2_scale": "(d) with llama3-style, G=N/2, logit scale 0.75",
}


def report(results_path: Path) -> str:
    """The results as a markdown table."""
    results = json.loads(Path(results_path).read_text())
    lines = [
        "| run | trainable params | steps | ppl @256 | ppl @512 | ppl @1024 | train s | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["runs"]:
        ppl = row["perplexity"]
        lines.append(
            f"| {LABELS[row['run']]} | {row['trainable_params']:,} | {row.get('steps', '')} | {ppl['256']:.3f} | {ppl['512']:.3f} | "
            f"{ppl['1024']:.3f} | {row['train_seconds']} | {row['peak_rss_mib']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/reproduction")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)  # internal: the extension steps of --only
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), help="only these configurations (default: all)")
    parser.add_argument("--reuse-base", action="store_true", help="keep the pretrained base already in --out")
    parser.add_argument("--report", help="print the markdown table of a results.json and exit")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    out = Path(args.out)
    setting = SETTINGS["quick" if args.quick else "full"]
    if args.only:
        print(json.dumps(run_one(out, args.only, args.steps or setting["extend_steps"], setting["eval_docs"])))
        return
    out.mkdir(parents=True, exist_ok=True)
    _, _, info = split_corpus()
    started = time.perf_counter()
    if not (args.reuse_base and (out / "base").is_dir()):
        pretrain(out, setting["pretrain_steps"])
        info["pretrain_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.runs or RUNS:
        steps = setting["extend_steps"]
        reference = RUNS[name].get("same_time_as")
        if reference:  # the steps that take (d) as long as the reference took
            seconds = {row["run"]: row["train_seconds"] for row in rows}
            missing = [run for run in (reference, "d_longlora_s2") if run not in seconds]
            if missing:
                raise SystemExit(f"{name} needs the training times of {missing}: run them first")
            steps = round(steps * seconds[reference] / seconds["d_longlora_s2"])
        command = [sys.executable, __file__, "--out", str(out), "--only", name, "--steps", str(steps)]
        result = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    info["setting"] = setting
    (out / "results.json").write_text(json.dumps({"info": info, "runs": rows}, indent=2))
    print(f"results: {out / 'results.json'} ({info['total_seconds']} s)")


if __name__ == "__main__":
    main()
