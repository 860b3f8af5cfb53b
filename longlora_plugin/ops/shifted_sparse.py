"""Shifted sparse attention (S2-Attn) on tensors: the SDPA backend, two varlen kernel backends (flash-attn 2 and
torch's own ``varlen_attn``), and the choice between them.

Heads ``[0, H // 2)`` attend inside groups ``p // G``; heads ``[H // 2, H)`` inside ``(p + G // 2) // G``, where p
is a token's position in its own document. Segments never wrap around, so no token ever sees a later one.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from .layout import Segments, TokenLayout, bucket_segments, s2_segments, token_layout

__all__ = [
    "s2_attention",
    "flash_attn_available",
    "torch_varlen_available",
    "backend_gaps",
    "layer_gaps",
    "Backend",
    "BACKENDS",
]

Backend = Literal["auto", "sdpa", "flash", "varlen"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash", "varlen")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _kernels_run_on(tensor: torch.Tensor) -> bool:
    """Whether the varlen kernels can run on this tensor's device (CUDA). Tests patch this to run emulations."""
    return tensor.is_cuda


def _flash_varlen_func() -> Callable | None:
    """flash-attn 2's ``flash_attn_varlen_func``, or None. flash-attn 4 installs only ``flash_attn.cute``."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen_func() -> Callable | None:
    """``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_attn_available() -> bool:
    """Whether ``from flash_attn import flash_attn_varlen_func`` works (flash-attn 2)."""
    return _flash_varlen_func() is not None


def torch_varlen_available() -> bool:
    """Whether this torch ships ``torch.nn.attention.varlen.varlen_attn``."""
    return _torch_varlen_func() is not None


def _parameters(func: Callable) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: assume the oldest one
        return frozenset()


def backend_gaps(
    backend: str,
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> list[str]:
    """What a kernel backend ("flash" or "varlen") lacks to serve this call exactly; empty when it can.

    query (B, H, S, D) or (T, H, D), key (B, H_kv, S, D) or (T, H_kv, D): only device, dtype, head counts and
    head_dim are read.
    """
    gaps = []
    if not _kernels_run_on(query):
        gaps.append(f"CUDA tensors (got device {query.device})")
    if query.dtype not in _KERNEL_DTYPES:
        gaps.append(f"float16/bfloat16 tensors (got {query.dtype})")
    return gaps + layer_gaps(
        backend,
        num_heads=query.shape[1],
        num_kv_heads=key.shape[1],
        head_dim=query.shape[-1],
        scaling=scaling,
        dropout=dropout,
        softcap=softcap,
        sliding_window=sliding_window,
    )


def layer_gaps(
    backend: str,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> list[str]:
    """What a kernel backend lacks for a layer of this shape, in this environment, whatever the device and dtype."""
    gaps = []
    if backend == "flash":
        func = _flash_varlen_func()
        if func is None:
            return ["flash-attn 2 (`from flash_attn import flash_attn_varlen_func` fails)"]
        params = _parameters(func)
        if head_dim > 256:
            gaps.append(f"head_dim <= 256 (got {head_dim})")
        if softcap is not None and "softcap" not in params:
            gaps.append("softcap support (flash-attn >= 2.6)")
        if softcap is not None and dropout > 0:
            gaps.append(f"dropout 0 with softcap (flash-attn refuses softcap with dropout {dropout})")
        if sliding_window is not None and "window_size" not in params:
            gaps.append("sliding-window support (flash-attn >= 2.3)")
        return gaps
    if backend != "varlen":
        raise ValueError(f"the kernel backends are 'flash' and 'varlen', got {backend!r}")
    func = _torch_varlen_func()
    if func is None:
        return [f"torch.nn.attention.varlen.varlen_attn (torch >= 2.10, this is {torch.__version__})"]
    params = _parameters(func)
    if head_dim % 8 or head_dim > 256:
        gaps.append(f"head_dim a multiple of 8 and <= 256 (got {head_dim})")
    if softcap is not None:
        gaps.append("softcap support (torch varlen_attn has none)")
    if dropout > 0:
        gaps.append(f"dropout support (torch varlen_attn has none; got dropout {dropout})")
    if sliding_window is not None and "window_size" not in params:
        gaps.append("sliding-window support (varlen_attn window_size, torch >= 2.11)")
    if scaling is not None and scaling != head_dim**-0.5 and "scale" not in params:
        gaps.append("a custom softmax scale (varlen_attn scale, torch >= 2.11)")
    if num_heads != num_kv_heads and "enable_gqa" not in params:
        gaps.append("GQA/MQA support (varlen_attn enable_gqa, torch >= 2.12)")
    return gaps


def _flash_deterministic() -> bool:
    """The Trainer's ``full_determinism`` sets FLASH_ATTENTION_DETERMINISTIC=1 (as transformers reads it)."""
    return os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _head_ranges(
    num_heads: int, group_size: int, shift: bool, head_offset: int = 0, total_heads: int | None = None
) -> list[tuple[int, int]]:
    """(number of heads, group offset) for each consecutive set of heads that shares one segmentation.

    The local heads are global heads [head_offset, head_offset + num_heads) of total_heads; global heads
    [total_heads // 2, total_heads) are the shifted ones.
    """
    offset = group_size // 2 if shift else 0
    if offset == 0:
        return [(num_heads, 0)]
    total = num_heads if total_heads is None else total_heads
    unshifted = min(max(total // 2 - head_offset, 0), num_heads)
    return [(n, off) for n, off in ((unshifted, 0), (num_heads - unshifted, offset)) if n]


def _split_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_counts: list[int], dim: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split q/k/v along the head dimension into consecutive query-head sets with their KV heads.

    Query head h reads KV head h // n_rep. torch.split keeps the backward a cat, not a zero-filled scatter.
    """
    n_rep = query.shape[dim] // key.shape[dim]
    queries = torch.split(query, head_counts, dim=dim)
    if all(n % n_rep == 0 for n in head_counts):
        kv_counts = [n // n_rep for n in head_counts]
        return list(zip(queries, torch.split(key, kv_counts, dim=dim), torch.split(value, kv_counts, dim=dim)))
    # A set cuts through a KV group: give each of its query heads its own KV copy.
    splits, first = [], 0
    for q_part, n in zip(queries, head_counts):
        index = torch.arange(first, first + n, device=key.device) // n_rep
        splits.append((q_part, key.index_select(dim, index), value.index_select(dim, index)))
        first += n
    return splits


def _gather(tokens: torch.Tensor, gather_index: torch.Tensor, has_padding: bool) -> torch.Tensor:
    """(T, h, D) -> (n, L, h, D); index T reads a zero row."""
    if has_padding:
        tokens = torch.cat([tokens, tokens.new_zeros(1, *tokens.shape[1:])])
    n, length = gather_index.shape
    return tokens.index_select(0, gather_index.reshape(-1)).view(n, length, *tokens.shape[1:])


def _local_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """(L, L) bool causal band inside a segment, or None when plain causal is exact."""
    if sliding_window is None or sliding_window >= length:
        return None
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]  # query minus key
    return (distance >= 0) & (distance < sliding_window)


def _attend_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    dropout: float,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention inside each of n independent segments. q (n, h, L, D), k/v (n, h_kv, L, D) -> (n, h, L, D)."""
    length = q.shape[2]
    band = _local_mask(length, sliding_window, q.device)
    if softcap is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=band,
            dropout_p=dropout,
            is_causal=band is None,
            scale=scaling,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    # SDPA cannot soft-cap logits; this costs O(n * h * L^2) memory, i.e. O(S * G), never O(S^2).
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (n, h, L, L)
    scores = torch.tanh(scores / softcap) * softcap
    allowed = band if band is not None else torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)


class _AssembleRows(torch.autograd.Function):
    """Write per-piece attention outputs into one (B, S, H, D) tensor; the backward hands out views of the grad.

    Plain cat/reshape would copy each piece once more and allocate again in the backward; at long lengths these
    page-faulting allocations cost a visible share of the step.
    """

    @staticmethod
    def forward(ctx, shape: torch.Size, placements: list[tuple[int, int, int, int, int]], *pieces: torch.Tensor):
        # piece (B*m, h, G, D); placement (seq start, seq end, head start, head end, groups m)
        out = pieces[0].new_empty(shape)  # (B, S, H, D)
        for piece, placement in zip(pieces, placements):
            region = _region(out, placement)  # (B, m, G, h, D)
            region.copy_(piece.view(region.shape[0], region.shape[1], *piece.shape[1:]).transpose(2, 3))
        ctx.placements = placements
        ctx.piece_shapes = [piece.shape for piece in pieces]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        piece_grads = (
            _region(grad, placement).transpose(2, 3).reshape(shape)  # a view when B is 1
            for shape, placement in zip(ctx.piece_shapes, ctx.placements)
        )
        return (None, None, *piece_grads)


def _region(full: torch.Tensor, placement: tuple[int, int, int, int, int]) -> torch.Tensor:
    """The view (B, m, G, h, D) of full (B, S, H, D) where one piece lies."""
    s0, s1, h0, h1, groups = placement
    return full[:, s0:s1, h0:h1].unflatten(1, (groups, -1))


def _sdpa_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: list[tuple[int, int]],
    group_size: int,
    **attend_kwargs,
) -> torch.Tensor:
    """Batched SDPA when every row is one whole document. q (B, H, S, D), k/v (B, H_kv, S, D) -> (B, S, H, D).

    Per head set, a row splits into a first segment (G - offset tokens when shifted), whole groups, and a shorter
    last group; whole groups fold into the batch dimension (a view when B is 1).
    """
    batch, num_heads, seq_len, head_dim = q.shape
    pieces, placements = [], []
    h0 = 0
    for (qh, kh, vh), (heads, offset) in zip(_split_heads(q, k, v, [n for n, _ in ranges], dim=1), ranges):
        first = min(group_size - offset, seq_len) if offset else 0
        body = (seq_len - first) // group_size * group_size
        lengths = [n for n in (first, body, seq_len - first - body) if n]
        s0 = 0
        for qp, kp, vp in zip(*(torch.split(x, lengths, dim=2) for x in (qh, kh, vh))):
            length = qp.shape[2]
            groups = length // group_size if length > group_size else 1

            def fold(x: torch.Tensor) -> torch.Tensor:  # (B, h, m*G, D) -> (B*m, h, G, D)
                return x.unflatten(2, (groups, -1)).transpose(1, 2).flatten(0, 1)

            pieces.append(_attend_segments(fold(qp), fold(kp), fold(vp), **attend_kwargs))
            placements.append((s0, s0 + length, h0, h0 + heads, groups))
            s0 += length
        h0 += heads
    return _AssembleRows.apply(torch.Size((batch, seq_len, num_heads, head_dim)), placements, *pieces)


def _sdpa_segments(
    q_tok: torch.Tensor,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    segments: Segments,
    group_size: int,
    **attend_kwargs,
) -> torch.Tensor:
    """Batched SDPA over bucketed segments of any layout. q_tok (T, h, D), k/v_tok (T, h_kv, D) -> (T, h, D)."""
    buckets, scatter_index = bucket_segments(segments, group_size)
    outputs = []
    for bucket in buckets:
        qb, kb, vb = (_gather(x, bucket.gather_index, bucket.has_padding) for x in (q_tok, k_tok, v_tok))
        out = _attend_segments(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), **attend_kwargs)
        outputs.append(out.transpose(1, 2).reshape(-1, *q_tok.shape[1:]))  # (n * L, h, D)
    return torch.cat(outputs).index_select(0, scatter_index)


def _flash_backend(
    q_tok: torch.Tensor,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    segments: Segments,
    group_size: int,
    *,
    scaling: float,
    dropout: float,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """flash-attn varlen over the segments as sequences. q_tok (T, h, D), k/v_tok (T, h_kv, D) -> (T, h, D)."""
    flash_attn_varlen_func = _flash_varlen_func()
    cu_seqlens = segments.cu_seqlens()  # (N + 1,) int32
    max_length = segments.max_length()
    extra = {}
    if softcap is not None:
        extra["softcap"] = softcap
    if sliding_window is not None:
        extra["window_size"] = (sliding_window - 1, 0)
    if "deterministic" in _parameters(flash_attn_varlen_func):
        extra["deterministic"] = _flash_deterministic()
    return flash_attn_varlen_func(
        q_tok.contiguous(),
        k_tok.contiguous(),
        v_tok.contiguous(),
        cu_seqlens,
        cu_seqlens,
        max_length,
        max_length,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        **extra,
    )


def _varlen_backend(
    q_tok: torch.Tensor,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    segments: Segments,
    group_size: int,
    *,
    scaling: float,
    dropout: float,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """torch's varlen_attn over the segments as sequences. q_tok (T, h, D), k/v_tok (T, h_kv, D) -> (T, h, D).

    Its signature moved: torch 2.10 takes ``is_causal``; 2.11 ``scale`` and ``window_size`` (causal is (-1, 0));
    2.12 ``enable_gqa``. backend_gaps has already refused what this torch cannot do.
    """
    varlen_attn = _torch_varlen_func()
    params = _parameters(varlen_attn)
    cu_seqlens = segments.cu_seqlens()  # (N + 1,) int32
    max_length = segments.max_length()
    extra = {}
    if "window_size" in params:
        extra["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in params:
        extra["scale"] = scaling
    if k_tok.shape[1] != q_tok.shape[1]:
        extra["enable_gqa"] = True
    return varlen_attn(
        q_tok.contiguous(),
        k_tok.contiguous(),
        v_tok.contiguous(),
        cu_seqlens,
        cu_seqlens,
        max_length,
        max_length,
        **extra,
    )


_KERNEL_BACKENDS = {"flash": _flash_backend, "varlen": _varlen_backend}


def _choose_backend(backend: str, query: torch.Tensor, key: torch.Tensor, *, rows_are_documents: bool = False, **layer) -> str:
    """The backend that runs this call. "auto" takes the first kernel that serves the layer exactly, else SDPA.

    Under "auto", a batch whose rows are whole documents stays on SDPA: its groups fold into the batch dimension as
    views, which beat the varlen kernels' gather and scatter (on an H200, torch 2.11, 64k tokens, H=32, D=128, bf16:
    S2 forward + backward 55 ms through SDPA against 96 ms through torch's varlen kernel). Varlen kernels serve
    padded and packed batches, which SDPA could only run in gathered buckets.
    """
    if backend not in BACKENDS:
        raise ValueError(f"S2-Attn backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return backend
    if backend != "auto":
        gaps = backend_gaps(backend, query, key, **layer)
        if gaps:
            raise ValueError(f"S2-Attn backend {backend!r} cannot serve this layer; it needs " + "; ".join(gaps))
        return backend
    if rows_are_documents or not _kernels_run_on(query) or query.dtype not in _KERNEL_DTYPES:
        return "sdpa"
    for candidate in ("flash", "varlen"):
        if not backend_gaps(candidate, query, key, **layer):
            return candidate
    return "sdpa"


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group_size: int,
    shift: bool = True,
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    layout: TokenLayout | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    backend: Backend = "auto",
    head_offset: int = 0,
    total_heads: int | None = None,
) -> torch.Tensor:
    """Shifted sparse attention for training.

    Args:
        query: (B, H, S, D). key, value: (B, H_kv, S, D), not repeated for GQA; H must be a multiple of H_kv.
        group_size: G, the group length in tokens (>= 1).
        shift: shift the groups of heads [H // 2, H) by G // 2; False gives plain short attention.
        padding_mask: (B, S) bool, True for real tokens. position_ids: (B or 1, S); a position that does not
            continue the previous one by +1 starts a new document. cu_seqlens: packed document boundaries over
            the flattened B * S slots. layout: a precomputed ``token_layout`` replacing the three above.
        scaling: softmax scale, default D ** -0.5. dropout: attention dropout probability.
        softcap: logit soft-capping (gemma2). sliding_window: a token sees at most this many tokens back.
        backend: "sdpa"; "flash" (flash-attn 2 varlen) or "varlen" (torch's varlen_attn), both CUDA fp16/bf16;
            or "auto": flash, else varlen, else sdpa, taking a kernel only when it serves the layer exactly
            (a forced kernel that cannot raises ValueError naming what it lacks).
        head_offset, total_heads: the H heads given are global heads [head_offset, head_offset + H) of
            total_heads (default H), as on one rank of head-parallel (Ulysses) attention; the shifted heads are
            the global [total_heads // 2, total_heads).

    Returns:
        (B, S, H, D) contiguous; padding slots are zero.
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if key.shape != value.shape or key.shape[0] != batch or key.shape[2] != seq_len or key.shape[3] != head_dim:
        raise ValueError(
            f"S2-Attn needs key/value of shape (B, H_kv, S, D) matching query {tuple(query.shape)}, "
            f"got key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"S2-Attn needs the query heads ({num_heads}) to be a multiple of the key/value heads ({num_kv_heads})"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"S2-Attn group_size must be a positive int, got {group_size!r}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    scaling = head_dim**-0.5 if scaling is None else scaling
    total = num_heads if total_heads is None else total_heads
    if isinstance(head_offset, bool) or not isinstance(head_offset, int) or not 0 <= head_offset <= total - num_heads:
        raise ValueError(
            f"S2-Attn head_offset must be an int in [0, total_heads - H] = [0, {total - num_heads}] "
            f"(H={num_heads}, total_heads={total_heads}), got {head_offset!r}"
        )
    if layout is None:
        layout = token_layout(
            batch,
            seq_len,
            padding_mask=padding_mask,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            device=query.device,
        )
    chosen = _choose_backend(
        backend, query, key, rows_are_documents=layout.rows_are_documents, scaling=scaling, dropout=dropout,
        softcap=softcap, sliding_window=sliding_window,
    )
    if layout.num_tokens == 0:  # all padding: zeros that stay in the graph, so that backward still runs
        anchor = (query.sum() + key.sum() + value.sum()) * 0
        return query.new_zeros(batch, seq_len, num_heads, head_dim) + anchor
    ranges = _head_ranges(num_heads, group_size, shift, head_offset, total)
    head_counts = [n for n, _ in ranges]
    attend_kwargs = dict(scaling=scaling, dropout=dropout, softcap=softcap, sliding_window=sliding_window)
    if chosen == "sdpa" and layout.rows_are_documents:
        return _sdpa_rows(query, key, value, ranges, group_size, **attend_kwargs)

    def to_tokens(x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], head_dim)  # (B*S, h, D)
        return x if layout.valid_index is None else x.index_select(0, layout.valid_index)  # (T, h, D)

    run = _KERNEL_BACKENDS.get(chosen, _sdpa_segments)
    parts = _split_heads(to_tokens(query), to_tokens(key), to_tokens(value), head_counts, dim=1)
    outputs = [
        run(q, k, v, s2_segments(layout, group_size, offset), group_size, **attend_kwargs)
        for (q, k, v), (_, offset) in zip(parts, ranges)
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (T, H, D)
    if layout.valid_index is not None:
        out = out.new_zeros(layout.num_slots, num_heads, head_dim).index_copy(0, layout.valid_index, out)
    return out.view(batch, seq_len, num_heads, head_dim)
