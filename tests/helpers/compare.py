"""One train-mode step's logits and gradients, for tests that compare two models on the same batch."""

from __future__ import annotations

import torch


def logits_and_grads(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A train-mode forward and backward: the logits and every parameter gradient, by parameter name."""
    model.train()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.logits, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
