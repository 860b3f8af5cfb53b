"""Make the short-context base model of the CPU demo (committed as recipes/demo/base/).

A tiny byte-level Llama trained from scratch, with full attention, on passkey-retrieval samples of up to 256 tokens,
with the loss on every token: copying the repeated filler forms the same in-context copying (induction) heads that
read the key back, so the model learns retrieval in about 1100 steps and, unlike a model trained on the key's digits
alone, also models the filler, which is what the LongLoRA fine-tuning then adapts to the longer positions.

    python recipes/demo/make_base.py --out recipes/demo/base
    python recipes/demo/make_base.py --layers 2 --out /tmp/base2   # the first, 2-layer base of docs/passkey-demo.md
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longlora_plugin.data.passkey import passkey_batch
from longlora_plugin.eval.passkey import passkey_accuracy
from longlora_plugin.data.tokenizer import byte_ids

BASE_CONTEXT = 256
encode = byte_ids


def base_config(num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256 + ENCODE_OFFSET,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=BASE_CONTEXT,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="recipes/demo/base")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target-accuracy", type=float, default=0.98)
    parser.add_argument("--layers", type=int, default=4, help="4 for the committed base (2 for the first one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = AutoModelForCausalLM.from_config(base_config(args.layers), attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.time()
    for step in range(1, args.steps + 1):
        length = rng.choice(range(112, BASE_CONTEXT + 1, 16))
        input_ids, labels, _ = passkey_batch(encode, length, args.batch_size, rng, intro="", answer_only_loss=False)
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            accuracy = passkey_accuracy(model, encode, BASE_CONTEXT, 64, seed=123, intro="")
            print(f"step {step} loss {loss.item():.4f} passkey@{BASE_CONTEXT} {accuracy:.2f} {time.time() - start:.0f}s", flush=True)
            if accuracy >= args.target_accuracy:
                break
    model.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
