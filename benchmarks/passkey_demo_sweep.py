"""One fine-tuning configuration of the CPU passkey demo, in a plain loop, with passkey accuracy as it trains.

The demo's recipe (recipes/demo/passkey-tiny-cpu.yaml) was chosen with this script; docs/passkey-demo.md lists the
configurations tried and what each reached. Each run prints, every --every steps, the running loss and the greedy
exact-match passkey accuracy with full attention at 256, 512 and 1024 tokens.

    python benchmarks/passkey_demo_sweep.py --rope llama3 --group-size 512 --rank 8 --lr 1e-3 --steps 600 --logit-scale 0.75
    python benchmarks/passkey_demo_sweep.py --attention sdpa ...   # the same fine-tuning with full attention
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from longlora_plugin import LongLoraConfig, get_longlora_model
from longlora_plugin.data.passkey import passkey_batch
from longlora_plugin.eval.passkey import passkey_accuracy
from longlora_plugin.data.tokenizer import byte_ids
from longlora_plugin.rope import refresh_rotary_embeddings

DEMO_BASE = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "base"


encode = byte_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(DEMO_BASE))
    parser.add_argument("--rope", default="linear", help="rope_type of the interpolation (factor 4)")
    parser.add_argument("--rope-extra", default="{}", help="JSON merged into rope_parameters, e.g. llama3 factors")
    parser.add_argument("--attention", default="s2_attention", help="training attention: s2_attention or sdpa")
    parser.add_argument("--group-size", type=int, default=512)
    parser.add_argument("--logit-scale", type=float, default=1.0, help="s2_logit_scale (1.0: the paper's S2-Attn)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-length", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--loss", choices=("all", "key", "all-but-key"), default="all")
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.base)
    config = LongLoraConfig.for_model(
        base, original_context=256, target_context=1024, s2_group_size=args.group_size, rope_type=args.rope,
        r=args.rank, lora_alpha=2 * args.rank, s2_logit_scale=args.logit_scale,
    )
    model = get_longlora_model(base, config)
    inner = model.get_base_model()
    extra = json.loads(args.rope_extra)
    if extra:
        inner.config.rope_parameters.update(extra)
        refresh_rotary_embeddings(inner)
    inner.set_attn_implementation(args.attention)
    print(f"rope_parameters {inner.config.rope_parameters}, training attention {args.attention}", flush=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    rng = random.Random(0)
    running, start = None, time.perf_counter()
    for step in range(1, args.steps + 1):
        length = rng.choice(range(args.min_length, args.max_length + 1, 32))
        input_ids, labels, answer_start = passkey_batch(
            encode, length, args.batch_size, rng, intro="", answer_only_loss=args.loss == "key"
        )
        if args.loss == "all-but-key":
            for row, first in enumerate(answer_start.tolist()):
                labels[row, first:] = -100
        model.train()
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.every == 0:
            accuracy = {n: passkey_accuracy(model, encode, n, args.trials, seed=5, intro="") for n in (256, 512, 1024)}
            shown = "  ".join(f"@{n} {100 * a:3.0f}%" for n, a in accuracy.items())
            print(f"step {step:5d}  loss {running:.3f}  passkey {shown}  {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
