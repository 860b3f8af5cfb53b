"""Pure-torch stand-ins for the two varlen attention kernels, so that their S2-Attn backends run in CI on CPU.

``flash_attn_varlen_func`` (flash-attn 2.8) and ``torch.nn.attention.varlen.varlen_attn`` (per torch release),
with the real signatures and defaults and the input checks the real kernels make: fp16/bf16 only, int32
contiguous cu_seqlens on the query's device, integer max_seqlen, head_dim limits, query heads a multiple of
key/value heads. Masks follow the kernels: causal aligned bottom-right, ``window_size=(left, right)`` with -1 for
"unbounded", rows that may see nothing give zeros. The math runs in float32 per sequence; autograd gives the
gradients. One check the kernels cannot afford is added: max_seqlen must cover the longest sequence.
"""

from __future__ import annotations

import types

import torch

__all__ = ["flash_attn_varlen_func", "make_torch_varlen_attn", "fake_flash_attn_module", "TORCH_VARLEN_VERSIONS"]

_HALF = (torch.float16, torch.bfloat16)


def _check_common(q, k, v, cu_q, cu_k, max_q, max_k, who: str) -> None:
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.dtype not in _HALF:
            raise RuntimeError(f"{who} only supports fp16 and bf16 data type, got {name} {x.dtype}")
        if x.dim() != 3:
            raise RuntimeError(f"{who} expects {name} of shape (total, heads, head_dim), got {tuple(x.shape)}")
        if x.stride(-1) != 1:
            raise RuntimeError(f"{who}: {name} must have contiguous last dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"{who}: query, key and value must have the same dtype")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise RuntimeError(f"{who}: key/value shapes {tuple(k.shape)}/{tuple(v.shape)} do not fit query {tuple(q.shape)}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32:
            raise RuntimeError(f"{who}: {name} must have dtype int32, got {cu.dtype}")
        if cu.device != q.device:
            raise RuntimeError(f"{who}: {name} must be on the query's device {q.device}, got {cu.device}")
        if not cu.is_contiguous() or cu.dim() != 1:
            raise RuntimeError(f"{who}: {name} must be a contiguous 1-D tensor")
    if cu_q.numel() != cu_k.numel():
        raise RuntimeError(f"{who}: cu_seqlens_q and cu_seqlens_k must have the same length")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"{who}: {name} must be a Python int, got {type(m).__name__}")
    if int(cu_q[-1]) != q.shape[0] or int(cu_k[-1]) != k.shape[0]:
        raise RuntimeError(f"{who}: cu_seqlens end at {int(cu_q[-1])}/{int(cu_k[-1])}, tokens {q.shape[0]}/{k.shape[0]}")
    lengths_q, lengths_k = (cu[1:] - cu[:-1] for cu in (cu_q, cu_k))
    if bool((lengths_q < 0).any()) or bool((lengths_k < 0).any()):
        raise RuntimeError(f"{who}: cu_seqlens must not decrease")
    if lengths_q.numel() and (int(lengths_q.max()) > max_q or int(lengths_k.max()) > max_k):
        raise RuntimeError(f"{who}: max_seqlen {max_q}/{max_k} below the longest sequence")
    if q.shape[1] % k.shape[1]:
        raise RuntimeError(f"{who}: number of heads in key/value ({k.shape[1]}) must divide heads in query ({q.shape[1]})")


def _attend_varlen(q, k, v, cu_q, cu_k, *, scale, left, right, softcap, dropout) -> torch.Tensor:
    """q (Tq, H, D), k/v (Tk, H_kv, D) -> (Tq, H, D). Query i of a sequence sees key j when
    i + Lk - Lq - left <= j <= i + Lk - Lq + right (a bound of -1 is unbounded)."""
    n_rep = q.shape[1] // k.shape[1]
    outputs = []
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        qs = q[q0:q1].float().transpose(0, 1)  # (H, Lq, D)
        ks = k[k0:k1].float().repeat_interleave(n_rep, 1).transpose(0, 1)  # (H, Lk, D)
        vs = v[k0:k1].float().repeat_interleave(n_rep, 1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) * scale  # (H, Lq, Lk)
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        j = torch.arange(k1 - k0)[None, :]
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing gives zeros
        if dropout > 0:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        outputs.append((probs @ vs).transpose(0, 1))  # (Lq, H, D)
    out = torch.cat(outputs) if outputs else q.new_zeros(q.shape, dtype=torch.float32)
    return out.to(q.dtype)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn 2.8's ``flash_attn_varlen_func``: q (Tq, H, D), k/v (Tk, H_kv, D) -> (Tq, H, D)."""
    who = "FlashAttention"
    _check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, who)
    if q.shape[-1] > 256:
        raise RuntimeError(f"{who} forward only supports head dimension at most 256, got {q.shape[-1]}")
    if softcap > 0.0 and dropout_p > 0.0:
        raise RuntimeError("Softcapping does not support dropout for now")
    if alibi_slopes is not None or return_attn_probs or block_table is not None:
        raise NotImplementedError("the emulation covers neither alibi, attention probabilities nor paged KV")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    left, right = window_size
    if causal:
        right = 0
    if left >= max_seqlen_k:
        left = -1
    if right >= max_seqlen_k:
        right = -1
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _attend_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, left=left, right=right, softcap=softcap, dropout=dropout_p
    )


def fake_flash_attn_module(func=flash_attn_varlen_func) -> types.ModuleType:
    """A stand-in ``flash_attn`` package exposing ``flash_attn_varlen_func`` (for sys.modules)."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = func
    module.__version__ = "2.8.3"
    return module


TORCH_VARLEN_VERSIONS = ("2.10", "2.11", "2.12", "2.13")


def _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa):
    who = "varlen_attn"
    if cu_seq_k is None:
        raise NotImplementedError("the emulation needs cu_seq_k")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.shape[1]}")
    _check_common(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, who)
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256:
        raise RuntimeError(f"{who}: head_dim must be a multiple of 8 and at most 256, got {head_dim}")
    if len(window_size) != 2:
        raise ValueError(f"window_size must have length 2, got {len(window_size)}")
    left, right = window_size
    scale = head_dim**-0.5 if scale is None else scale
    return _attend_varlen(query, key, value, cu_seq_q, cu_seq_k, scale=scale, left=left, right=right, softcap=0.0, dropout=0.0)


def make_torch_varlen_attn(version: str = "2.13"):
    """``varlen_attn`` with the signature of one torch release (2.10: is_causal; 2.11: scale, window_size;
    2.12: enable_gqa; 2.13: seqused_k, block_table, num_splits)."""
    if version == "2.10":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            window = (-1, 0) if is_causal else (-1, -1)
            return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=window, enable_gqa=False)

    elif version == "2.11":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
            return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size, enable_gqa=False)

    elif version == "2.12":

        def varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False
        ):
            return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size, enable_gqa=enable_gqa)

    elif version == "2.13":

        def varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
            seqused_k=None,
            block_table=None,
            num_splits=None,
        ):
            if seqused_k is not None or block_table is not None:
                raise NotImplementedError("the emulation covers no paged KV cache")
            return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size, enable_gqa=enable_gqa)

    else:
        raise ValueError(f"version must be one of {TORCH_VARLEN_VERSIONS}, got {version!r}")
    return varlen_attn
