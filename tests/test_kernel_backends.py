"""The flash-attn and torch-varlen S2 backends, run on CPU through pure-torch emulations of their kernels.

The emulations (tests/helpers/kernel_emulations.py) are first checked against plain attention; then both backends
run the SDPA backend's matrix against the slow reference (outputs and q/k/v gradients), at model level too, and
broken emulations show that the comparison catches a wrong window, a dropped softcap and a lost document boundary.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types

import pytest
import torch
import torch.nn.attention.varlen as torch_varlen
from tests.helpers import kernel_emulations as emu
from tests.helpers.compare import logits_and_grads
from tests.helpers.reference import reference_s2_attention
from tests.test_s2_ops import LAYOUTS, SHAPES, make_layout, random_qkv

from longlora_plugin.ops import backend_gaps, s2_attention
from longlora_plugin.ops import shifted_sparse

HALF = [torch.float16, torch.bfloat16]
TOLERANCE = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


class Kernels:
    """The emulated kernels installed for one test, with a count of the calls each one got."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls = {"flash": 0, "varlen": 0}
        self.flash_kwargs: list[dict] = []
        monkeypatch.setattr(shifted_sparse, "_kernels_run_on", lambda tensor: True)
        self.install_flash(emu.flash_attn_varlen_func)
        self.install_varlen(emu.make_torch_varlen_attn("2.13"))

    def install_flash(self, func):
        def counted(*args, **kwargs):
            self.calls["flash"] += 1
            self.flash_kwargs.append(kwargs)
            return func(*args, **kwargs)

        counted.__signature__ = inspect.signature(func)
        self.monkeypatch.setitem(sys.modules, "flash_attn", emu.fake_flash_attn_module(counted))

    def remove_flash(self):
        self.monkeypatch.setitem(sys.modules, "flash_attn", None)

    def install_varlen(self, func):
        def counted(*args, **kwargs):
            self.calls["varlen"] += 1
            return func(*args, **kwargs)

        counted.__signature__ = inspect.signature(func)
        self.monkeypatch.setattr(torch_varlen, "varlen_attn", counted)


@pytest.fixture
def kernels(monkeypatch):
    return Kernels(monkeypatch)


# --- the emulations against plain attention ----------------------------------------------------------------------


def plain_attention(q, k, v, allowed, scale=None, softcap=None):
    """q (Lq, H, D), k/v (Lk, H_kv, D), allowed (Lq, Lk) -> (Lq, H, D), float64; rows seeing nothing give 0."""
    n_rep = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double().transpose(0, 1), k.double().repeat_interleave(n_rep, 1).transpose(0, 1), v.double()
    scores = qd @ kd.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ vd.repeat_interleave(n_rep, 1).transpose(0, 1)).transpose(0, 1)


def packed_inputs(lengths_q, lengths_k, heads=4, kv_heads=2, head_dim=16, dtype=torch.float16):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(sum(lengths_k), kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lengths_q, lengths_k))
    return q, k, v, cu_q, cu_k


def expected_packed(q, k, v, cu_q, cu_k, rule, **kwargs):
    outs = []
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]))
        i = torch.arange(q1 - q0)[:, None]
        j = torch.arange(k1 - k0)[None, :]
        outs.append(plain_attention(q[q0:q1], k[k0:k1], v[k0:k1], rule(i, j, q1 - q0, k1 - k0), **kwargs))
    return torch.cat(outs)


KERNELS = {
    "flash": lambda **kw: emu.flash_attn_varlen_func,
    "varlen-2.13": lambda **kw: emu.make_torch_varlen_attn("2.13"),
}


def call_kernel(name, q, k, v, cu_q, cu_k, *, causal=False, window=(-1, -1), scale=None, softcap=None):
    max_q, max_k = (int((cu[1:] - cu[:-1]).max()) for cu in (cu_q, cu_k))
    if name == "flash":
        extra = dict(softcap=softcap) if softcap is not None else {}
        return emu.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, window_size=window, **extra
        )
    version = name.split("-")[1]
    func = emu.make_torch_varlen_attn(version)
    if version == "2.10":
        return func(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=causal)
    window = (window[0], 0) if causal else window
    gqa = dict(enable_gqa=True) if version != "2.11" else {}
    return func(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window, **gqa)


@pytest.mark.parametrize("name", ["flash", "varlen-2.10", "varlen-2.11", "varlen-2.12", "varlen-2.13"])
@pytest.mark.parametrize("dtype", HALF)
def test_emulated_kernels_equal_causal_attention_per_sequence(name, dtype):
    kv = 4 if name in ("varlen-2.10", "varlen-2.11") else 2
    q, k, v, cu_q, cu_k = packed_inputs([5, 1, 12], [5, 1, 12], kv_heads=kv, dtype=dtype)
    out = call_kernel(name, q, k, v, cu_q, cu_k, causal=True)
    expected = expected_packed(q, k, v, cu_q, cu_k, lambda i, j, lq, lk: j <= i)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("name", ["flash", "varlen-2.13"])
def test_emulated_causal_is_aligned_bottom_right(name):
    """With fewer queries than keys, the last query sees every key (flash-attn >= 2.1 convention)."""
    q, k, v, cu_q, cu_k = packed_inputs([3, 2], [7, 4])
    out = call_kernel(name, q, k, v, cu_q, cu_k, causal=True)
    expected = expected_packed(q, k, v, cu_q, cu_k, lambda i, j, lq, lk: j <= i + lk - lq)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.float16])


@pytest.mark.parametrize("name", ["flash", "varlen-2.13"])
@pytest.mark.parametrize("window", [(2, 0), (0, 0), (3, 1), (-1, 2)])
def test_emulated_window_size_is_left_right_inclusive(name, window):
    q, k, v, cu_q, cu_k = packed_inputs([9, 4], [9, 4])
    out = call_kernel(name, q, k, v, cu_q, cu_k, window=window)
    left, right = window

    def rule(i, j, lq, lk):
        ok = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
        return ok

    torch.testing.assert_close(out.double(), expected_packed(q, k, v, cu_q, cu_k, rule), **TOLERANCE[torch.float16])


def test_emulated_flash_softcap_and_scale():
    q, k, v, cu_q, cu_k = packed_inputs([6, 8], [6, 8])
    out = call_kernel("flash", q * 4, k, v, cu_q, cu_k, causal=True, scale=0.3, softcap=2.0)
    expected = expected_packed(q * 4, k, v, cu_q, cu_k, lambda i, j, lq, lk: j <= i, scale=0.3, softcap=2.0)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.float16])


def test_emulated_kernels_have_gradients_of_plain_attention():
    q, k, v, cu_q, cu_k = packed_inputs([7, 3], [7, 3], dtype=torch.float16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (call_kernel("flash", *leaves, cu_q, cu_k, causal=True).double() * grad).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    (expected_packed(*ref, cu_q, cu_k, lambda i, j, lq, lk: j <= i) * grad).sum().backward()
    for ours, theirs in zip(leaves, ref):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-2, rtol=1e-2)


BAD_INPUTS = [
    ("float32", lambda q, k, v, cu: (q.float(), k.float(), v.float(), cu, 5), "fp16 and bf16"),
    ("int64-cu", lambda q, k, v, cu: (q, k, v, cu.long(), 5), "int32"),
    ("strided-cu", lambda q, k, v, cu: (q, k, v, torch.stack([cu, cu], 1)[:, 0], 5), "contiguous"),
    ("meta-cu", lambda q, k, v, cu: (q, k, v, cu.to("meta"), 5), "device"),
    ("tensor-max", lambda q, k, v, cu: (q, k, v, cu, torch.tensor(5)), "must be a Python int"),
    ("short-max", lambda q, k, v, cu: (q, k, v, cu, 2), "below the longest"),
    ("heads", lambda q, k, v, cu: (q[:, :3], k, v, cu, 5), "must divide"),
]


@pytest.mark.parametrize("name", ["flash", "varlen-2.13"])
@pytest.mark.parametrize("case,change,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_emulated_kernels_refuse_what_the_kernels_refuse(name, case, change, message):
    q, k, v, cu, _ = packed_inputs([5, 3], [5, 3], kv_heads=2)
    q, k, v, cu, max_len = change(q, k, v, cu)
    func = emu.flash_attn_varlen_func if name == "flash" else emu.make_torch_varlen_attn("2.13")
    extra = dict(causal=True) if name == "flash" else dict(window_size=(-1, 0), enable_gqa=True)
    with pytest.raises((RuntimeError, TypeError), match=message):
        func(q, k, v, cu, cu, max_len, max_len, **extra)


def test_emulated_kernel_head_dim_limits_and_kernel_specific_refusals():
    q, k, v, cu, _ = packed_inputs([4], [4], head_dim=264)
    with pytest.raises(RuntimeError, match="head dimension at most 256"):
        emu.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)
    q, k, v, cu, _ = packed_inputs([4], [4], kv_heads=4, head_dim=12)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        emu.make_torch_varlen_attn("2.13")(q, k, v, cu, cu, 4, 4)
    q, k, v, cu, _ = packed_inputs([4], [4], kv_heads=2)
    with pytest.raises(ValueError, match="same number of heads"):
        emu.make_torch_varlen_attn("2.13")(q, k, v, cu, cu, 4, 4)
    with pytest.raises(RuntimeError, match="Softcapping does not support dropout"):
        emu.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, dropout_p=0.1, softcap=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'window_size'"):
        emu.make_torch_varlen_attn("2.10")(q, k, v, cu, cu, 4, 4, window_size=(-1, 0))


# --- the S2 backends through the emulations, against the reference ------------------------------------------------


def s2_errors(backends, q, k, v, **kwargs) -> dict[str, dict[str, float]]:
    """Run S2 with each backend and once with the reference; assert they agree (per dtype tolerance).

    Returns the max abs errors per backend: output and q/k/v gradients.
    """
    grad_out = None
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    layer = dict(kwargs)
    layer.pop("dropout", None)
    expected = reference_s2_attention(ref_q, ref_k, ref_v, **layer)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (expected * grad_out).sum().backward()
    tol = TOLERANCE[q.dtype]
    errors = {}
    for backend in [backends] if isinstance(backends, str) else backends:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = s2_attention(*leaves, backend=backend, **kwargs)
        (out.double() * grad_out).sum().backward()
        errors[backend] = {}
        pairs = (("out", out, expected), *zip(("dq", "dk", "dv"), (x.grad for x in leaves), (ref_q.grad, ref_k.grad, ref_v.grad)))
        for name, ours, ref in pairs:
            ours, ref = ours.detach().double(), ref.detach()
            torch.testing.assert_close(ours, ref, **tol, msg=lambda m, b=backend, n=name: f"{b} {n}: {m}")
            errors[backend][name] = float((ours - ref).abs().max())
    return errors


def run_case(kernels, dtype, shape, layout, backends=("flash", "varlen"), **kwargs):
    batch, heads, kv_heads, seq_len, group_size = shape
    q, k, v = random_qkv(batch, heads, kv_heads, seq_len, head_dim=8, dtype=dtype)
    before = dict(kernels.calls)
    errors = s2_errors(backends, q, k, v, group_size=group_size, **make_layout(layout, batch, seq_len), **kwargs)
    for backend in backends:
        assert kernels.calls[backend] > before[backend], f"the {backend} kernel did not run"
    return errors


SHAPE_VALUES = [p.values for p in SHAPES]
SHAPE_IDS = [p.id for p in SHAPES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPE_VALUES, ids=SHAPE_IDS)
def test_kernel_backends_match_reference_fp16(kernels, shape, layout):
    run_case(kernels, torch.float16, shape, layout)


@pytest.mark.parametrize("layout", ["none", "ragged-both", "packed-cu"])
@pytest.mark.parametrize("shape", SHAPE_VALUES[1:3], ids=SHAPE_IDS[1:3])
def test_kernel_backends_match_reference_bf16(kernels, shape, layout):
    run_case(kernels, torch.bfloat16, shape, layout)


@pytest.mark.parametrize("layout", ["none", "left-pad", "packed-cu"])
def test_kernel_backends_shift_off(kernels, layout):
    run_case(kernels, torch.float16, (2, 4, 2, 26, 6), layout, shift=False)


@pytest.mark.parametrize(
    "layout,window", [("none", 1), ("none", 3), ("none", 7), ("none", 100), ("right-pad", 3), ("restart-position-ids", 3)]
)
def test_kernel_backends_sliding_window(kernels, layout, window):
    run_case(kernels, torch.float16, (2, 4, 2, 30, 8), layout, sliding_window=window)


@pytest.mark.parametrize("layout", ["none", "left-pad", "packed-cu"])
def test_flash_backend_softcap(kernels, layout):
    q, k, v = random_qkv(2, 4, 2, 27, dtype=torch.float16)
    q.data *= 4  # large logits, so that the cap matters
    s2_errors(["flash"], q, k, v, group_size=8, softcap=3.0, scaling=0.3, **make_layout(layout, 2, 27))
    assert kernels.calls["flash"] > 0


# --- backend choice, fallbacks and the three flash-path fixes ------------------------------------------------------


def fp16_qkv(heads=4, kv_heads=4, head_dim=8):
    return random_qkv(2, heads, kv_heads, 12, head_dim=head_dim, dtype=torch.float16)


RAGGED = torch.tensor([[True] * 12, [False] * 3 + [True] * 9])  # rows that are not whole documents


def test_auto_prefers_flash_then_varlen(kernels):
    q, k, v = fp16_qkv()
    s2_attention(q, k, v, group_size=4, padding_mask=RAGGED)
    assert kernels.calls == {"flash": 2, "varlen": 0}  # one call per head set (shifted and not)
    kernels.remove_flash()
    s2_attention(q, k, v, group_size=4, padding_mask=RAGGED)
    assert kernels.calls == {"flash": 2, "varlen": 2}


def test_auto_keeps_whole_document_rows_on_the_sdpa_path(kernels):
    """Rows that are whole documents fold into SDPA's batch as views: faster than a varlen kernel (measured)."""
    q, k, v = fp16_qkv()
    s2_attention(q, k, v, group_size=4)
    assert kernels.calls == {"flash": 0, "varlen": 0}
    s2_attention(q, k, v, group_size=4, backend="varlen")  # forcing a kernel still takes it
    assert kernels.calls == {"flash": 0, "varlen": 2}


def test_flash_attn_4_cute_only_package_does_not_make_auto_choose_flash(kernels, monkeypatch):
    """flash-attn 4 ships only flash_attn.cute: the module exists but flash_attn_varlen_func does not import."""
    cute_only = types.ModuleType("flash_attn")
    cute_only.__path__ = []
    monkeypatch.setitem(sys.modules, "flash_attn", cute_only)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    assert not shifted_sparse.flash_attn_available()
    q, k, v = fp16_qkv()
    out = s2_attention(q, k, v, group_size=4, padding_mask=RAGGED)  # auto: torch varlen, no ImportError
    assert kernels.calls == {"flash": 0, "varlen": 2} and out.shape == (2, 12, 4, 8)
    with pytest.raises(ValueError, match=r"backend 'flash' cannot serve.*flash-attn 2"):
        s2_attention(q, k, v, group_size=4, backend="flash")


def test_softcap_with_dropout_takes_the_sdpa_path_under_auto_and_is_refused_when_forced(kernels):
    q, k, v = fp16_qkv()
    torch.manual_seed(0)
    out = s2_attention(q, k, v, group_size=4, softcap=2.0, dropout=0.1, padding_mask=RAGGED)
    assert kernels.calls == {"flash": 0, "varlen": 0} and out.shape == (2, 12, 4, 8)
    with pytest.raises(ValueError, match=r"backend 'flash' cannot serve.*softcap .*dropout 0.1"):
        s2_attention(q, k, v, group_size=4, softcap=2.0, dropout=0.1, backend="flash")
    # Without dropout flash serves softcap; with dropout alone too.
    s2_attention(q, k, v, group_size=4, softcap=2.0, padding_mask=RAGGED)
    s2_attention(q, k, v, group_size=4, dropout=0.1, padding_mask=RAGGED)
    assert kernels.calls["flash"] == 4


@pytest.mark.parametrize("source", ["env", "torch", "neither"])
def test_flash_gets_deterministic_from_the_env_or_torch(kernels, monkeypatch, source):
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    if source == "env":
        monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", "1")
    if source == "torch":
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
    try:
        s2_attention(*fp16_qkv(), group_size=4, backend="flash")
    finally:
        if source == "torch":
            torch.use_deterministic_algorithms(previous)
    assert [kw["deterministic"] for kw in kernels.flash_kwargs] == [source != "neither"] * 2


def test_a_flash_attn_without_the_deterministic_argument_is_still_called(kernels):
    def old_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        return emu.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap)

    kernels.install_flash(old_flash)
    s2_attention(*fp16_qkv(), group_size=4, backend="flash")
    assert kernels.calls["flash"] == 2 and "deterministic" not in kernels.flash_kwargs[0]


# (torch version, layer kwargs, kv heads, gap named when forced)
OLD_TORCH = [
    ("2.10", dict(sliding_window=3), 4, "sliding-window support"),
    ("2.10", dict(scaling=0.2), 4, "custom softmax scale"),
    ("2.11", {}, 2, "GQA/MQA support"),
    ("2.13", dict(softcap=2.0), 4, "softcap support"),
    ("2.13", dict(dropout=0.1), 4, "dropout support"),
]


@pytest.mark.parametrize("version,layer,kv_heads,gap", OLD_TORCH, ids=[f"{c[0]}-{c[3]}" for c in OLD_TORCH])
def test_varlen_falls_back_to_sdpa_for_what_this_torch_lacks(kernels, version, layer, kv_heads, gap):
    kernels.remove_flash()
    kernels.install_varlen(emu.make_torch_varlen_attn(version))
    q, k, v = fp16_qkv(kv_heads=kv_heads)
    s2_attention(q, k, v, group_size=4, **layer)
    assert kernels.calls["varlen"] == 0  # auto took the SDPA path
    with pytest.raises(ValueError, match=f"backend 'varlen' cannot serve this layer; it needs .*{gap}"):
        s2_attention(q, k, v, group_size=4, backend="varlen", **layer)


@pytest.mark.parametrize("version", emu.TORCH_VARLEN_VERSIONS)
def test_varlen_backend_calls_every_torch_signature_correctly(kernels, version):
    """Each release's signature, with what it supports, against the reference (GQA from 2.12)."""
    kernels.remove_flash()
    kernels.install_varlen(emu.make_torch_varlen_attn(version))
    kv_heads = 2 if version >= "2.12" else 4
    extra = dict(sliding_window=3, scaling=0.25) if version >= "2.11" else {}
    q, k, v = random_qkv(2, 4, kv_heads, 19, dtype=torch.float16)
    s2_errors("varlen", q, k, v, group_size=6, **make_layout("ragged-both", 2, 19), **extra)
    assert kernels.calls["varlen"] == 2


def test_head_dim_beyond_the_kernels_falls_back_and_forcing_names_it(kernels):
    q, k, v = fp16_qkv(head_dim=12)
    s2_attention(q, k, v, group_size=4, backend="flash")  # flash-attn pads head_dim itself
    assert kernels.calls["flash"] == 2
    kernels.remove_flash()
    s2_attention(q, k, v, group_size=4)
    assert kernels.calls["varlen"] == 0
    with pytest.raises(ValueError, match=r"head_dim a multiple of 8 and <= 256 \(got 12\)"):
        s2_attention(q, k, v, group_size=4, backend="varlen")
    assert backend_gaps("flash", torch.empty(1, 1, 300, dtype=torch.float16), torch.empty(1, 1, 300)) == [
        "flash-attn 2 (`from flash_attn import flash_attn_varlen_func` fails)"
    ]


def test_float32_or_cpu_never_takes_a_kernel_under_auto(monkeypatch):
    q, k, v = random_qkv(1, 4, 4, 10)
    out = s2_attention(q, k, v, group_size=4)  # real CPU predicate: SDPA path
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"CUDA tensors \(got device cpu\); float16/bfloat16 tensors \(got torch.float32\)"):
        s2_attention(q, k, v, group_size=4, backend="varlen")


# --- mutation check: a broken kernel must fail the comparison -------------------------------------------------------


def off_by_one_window(func):
    @functools.wraps(func)
    def broken(*args, window_size=(-1, -1), **kwargs):
        left, right = window_size
        return func(*args, window_size=(left + 1 if left >= 0 else left, right), **kwargs)

    return broken


def dropped_softcap(func):
    @functools.wraps(func)
    def broken(*args, softcap=0.0, **kwargs):
        return func(*args, **kwargs)

    return broken


def lost_boundary(func):
    """Merges the first two sequences: their boundary is lost."""

    @functools.wraps(func)
    def broken(q, k, v, cu_q, cu_k, max_q, max_k, *args, **kwargs):
        cu = torch.cat([cu_q[:1], cu_q[2:]]) if cu_q.numel() > 2 else cu_q
        longest = int((cu[1:] - cu[:-1]).max())
        return func(q, k, v, cu, cu, longest, longest, *args, **kwargs)

    return broken


MUTATIONS = [
    ("flash", "window", off_by_one_window, dict(sliding_window=3)),
    ("varlen", "window", off_by_one_window, dict(sliding_window=3)),
    ("flash", "softcap", dropped_softcap, dict(softcap=1.0)),
    ("flash", "boundary", lost_boundary, dict(shift=False, group_size=64)),
    ("varlen", "boundary", lost_boundary, dict(shift=False, group_size=64)),
]


@pytest.mark.parametrize("backend,what,mutate,layer", MUTATIONS, ids=[f"{m[0]}-{m[1]}" for m in MUTATIONS])
def test_comparison_catches_a_broken_kernel(kernels, backend, what, mutate, layer):
    if backend == "flash":
        kernels.install_flash(mutate(emu.flash_attn_varlen_func))
    else:
        kernels.install_varlen(mutate(emu.make_torch_varlen_attn("2.13")))
    layout = "packed-cu" if what == "boundary" else "none"
    kwargs = {"group_size": 8, **layer}
    q, k, v = random_qkv(2, 4, 2, 30, dtype=torch.float16)
    if what == "softcap":
        q.data *= 4
    with pytest.raises(AssertionError, match=f"{backend} (out|dq|dk|dv)"):
        s2_errors(backend, q, k, v, **make_layout(layout, 2, 30), **kwargs)


# --- model level ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type,backend,flash_installed",
    [("llama", "flash", True), ("llama", "varlen", False), ("gemma2", "flash", True), ("gemma2", "auto", False)],
)
def test_tiny_models_train_mode_through_the_kernels_match_reference(kernels, model_type, backend, flash_installed):
    from tests.test_model_families import REFERENCE, build_pair, padded_batch

    if not flash_installed:
        kernels.remove_flash()
    model, reference = build_pair(model_type, REFERENCE, s2_backend=backend)
    model, reference = model.to(torch.bfloat16), reference.to(torch.bfloat16)
    input_ids, mask, labels = padded_batch(model.config.vocab_size)
    results = [logits_and_grads(m, input_ids, mask, labels) for m in (model, reference)]
    (logits, grads), (ref_logits, ref_grads) = (
        (logits.float(), {name: grad.float() for name, grad in grads.items()}) for logits, grads in results
    )
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=3e-2, rtol=3e-2)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        scale = float(ref_grads[name].abs().max()) + 1e-6
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale, atol=3e-2, rtol=3e-2, msg=name)
    # gemma2 has softcap: under auto without flash-attn, torch varlen cannot serve it and SDPA runs instead.
    expected = {"flash": "flash", "varlen": "varlen", "auto": None}[backend]
    assert (kernels.calls["flash"] > 0) == (expected == "flash") and (kernels.calls["varlen"] > 0) == (expected == "varlen")


def test_a_forced_kernel_that_cannot_serve_the_model_fails_at_load(kernels):
    from tests.helpers.families import tiny_config
    from transformers import AutoModelForCausalLM

    from longlora_plugin import S2_ATTENTION

    def load(model_type, **overrides):
        return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation=S2_ATTENTION)

    with pytest.raises(ValueError, match=r"s2_backend='varlen' cannot serve model_type 'gemma2'; it needs softcap"):
        load("gemma2", s2_backend="varlen")
    with pytest.raises(ValueError, match=r"'flash' cannot serve model_type 'gemma2'; it needs dropout 0 with softcap"):
        load("gemma2", s2_backend="flash", attention_dropout=0.1)
    load("gemma2", s2_backend="flash")  # flash-attn serves softcap and the window
    kernels.install_varlen(emu.make_torch_varlen_attn("2.11"))
    with pytest.raises(ValueError, match=r"'varlen' cannot serve model_type 'llama'; it needs GQA/MQA support"):
        load("llama", s2_backend="varlen")
    load("llama", s2_backend="varlen", num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"'varlen' cannot serve model_type 'llama'; it needs .*head_dim a multiple of 8"):
        load("llama", s2_backend="varlen", num_key_value_heads=4, hidden_size=48)
    kernels.remove_flash()
    with pytest.raises(ValueError, match=r"'flash' cannot serve model_type 'llama'; it needs flash-attn 2"):
        load("llama", s2_backend="flash")


# --- the real kernels, on a CUDA machine ------------------------------------------------------------------------------

GPU = "cuda"  # a rehearsal on CPU (with the emulations installed) sets this to "cpu"
cuda_varlen = pytest.mark.skipif(
    not (torch.cuda.is_available() and shifted_sparse.torch_varlen_available()),
    reason="needs CUDA and torch.nn.attention.varlen (torch >= 2.10)",
)


def varlen_supports_gqa() -> bool:
    return "enable_gqa" in inspect.signature(torch_varlen.varlen_attn).parameters


@pytest.mark.gpu
@cuda_varlen
@pytest.mark.parametrize("layout", LAYOUTS)
def test_varlen_backend_matches_sdpa_backend_on_gpu(layout):
    batch, seq_len = 3, 301
    kv_heads = 2 if varlen_supports_gqa() else 8
    q, k, v = (x.detach().to(GPU, torch.bfloat16).requires_grad_() for x in random_qkv(batch, 8, kv_heads, seq_len, head_dim=64))
    kwargs = dict(group_size=64, **{n: t.to(GPU) for n, t in make_layout(layout, batch, seq_len).items()})
    grad_out = torch.randn(batch, seq_len, 8, 64, device=GPU, dtype=torch.bfloat16)
    results = []
    for backend in ("varlen", "sdpa"):
        for x in (q, k, v):
            x.grad = None
        out = s2_attention(q, k, v, backend=backend, **kwargs)
        (out * grad_out).sum().backward()
        results.append((out.detach().float(), *(x.grad.float() for x in (q, k, v))))
    for name, varlen, sdpa in zip(("out", "dq", "dk", "dv"), *results):
        scale = float(sdpa.abs().max())  # bf16 rounding grows with the magnitude (dk/dv sum over query heads)
        torch.testing.assert_close(varlen / scale, sdpa / scale, atol=1e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
@cuda_varlen
def test_auto_takes_the_torch_varlen_kernel_on_cuda_bf16_without_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    real = torch_varlen.varlen_attn
    calls = []

    @functools.wraps(real)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_varlen, "varlen_attn", counted)
    q, k, v = (torch.randn(1, 8, 256, 64, device=GPU, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    packed = torch.tensor([0, 100, 256], dtype=torch.int32, device=GPU)  # whole rows would stay on SDPA
    s2_attention(q, k, v, group_size=64, cu_seqlens=packed).sum().backward()
    assert len(calls) == 2 and q.grad is not None


@pytest.mark.gpu
@cuda_varlen
def test_tiny_llama_trains_through_the_real_varlen_kernel_like_the_sdpa_path():
    from tests.test_model_families import build_pair, padded_batch
    from longlora_plugin import S2_ATTENTION

    model, other = build_pair("llama", S2_ATTENTION, s2_backend="varlen", num_key_value_heads=4)
    other.config.s2_backend = "sdpa"
    input_ids, mask, labels = (x.to(GPU) for x in padded_batch(model.config.vocab_size))
    grads = []
    for m in (model, other):
        m.to(GPU, torch.bfloat16).train()
        out = m(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        scale = float(grads[1][name].abs().max()) + 1e-6
        torch.testing.assert_close(grads[0][name] / scale, grads[1][name] / scale, atol=3e-2, rtol=3e-2, msg=name)
