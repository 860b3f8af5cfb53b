"""The GPU check's benchmark: S2-Attn kernels and a 7B-shaped training step, timed side by side, plus path checks.

1. Paths: on CUDA bf16 "auto" must take flash-attn 2 when it imports, else torch's varlen kernel; each kernel
   backend that should run must run (counted calls). A path that should have run and did not makes the exit
   status non-zero.
2. Kernel: S2 (SDPA path, torch varlen, flash-attn where present) vs full causal attention, bf16, forward +
   backward, B=1, H=32, D=128, G=N/4, at 32k and 64k tokens; one GQA packed case (H_kv=8, packed documents).
   Every S2 backend's output and q/k/v gradients are checked against the SDPA path.
3. Step: one LoRA training step (forward, backward, optimizer step) of a Llama-2-7B-shaped slice (hidden 4096,
   32 heads, intermediate 11008, vocab 32000, 2 layers, bf16) at 32k / 64k / 100k tokens: full SDPA attention
   vs S2 with each backend; time and torch.cuda.max_memory_allocated.

Every case runs in try/except: an error is recorded in the JSON and the run goes on. The JSON is rewritten after
each case, so a run cut short still leaves its figures.

    PYTHONPATH=. python3 benchmarks/bench_s2_gpu.py --out gpu-results          # on the GPU machine
    PYTHONPATH=. python3 benchmarks/bench_s2_gpu.py --dry-run --out /tmp/dry     # CPU rehearsal, tiny shapes

``--dry-run`` (or LONGLORA_DRY_RUN=1) shrinks every shape and, without CUDA, runs the kernel backends through the
test emulations (tests/helpers/kernel_emulations.py, torch 2.11's varlen signature, as on the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from longlora_plugin.ops import flash_attn_available, s2_attention, torch_varlen_available
from longlora_plugin.ops import shifted_sparse

KERNEL_SHAPE = dict(heads=32, kv_heads=32, head_dim=128)
GQA_SHAPE = dict(heads=32, kv_heads=8, head_dim=128)
LLAMA2_7B_SLICE = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000
)
DRY_KERNEL_SHAPE = dict(heads=4, kv_heads=4, head_dim=16)
DRY_GQA_SHAPE = dict(heads=4, kv_heads=2, head_dim=16)
DRY_SLICE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, vocab_size=256)


class Run:
    """Results, written to JSON after each case, and the list of required paths that did not run."""

    def __init__(self, out_dir: Path, dry_run: bool):
        self.path = out_dir / "gpu-bench.json"
        self.data: dict = {"dry_run": dry_run, "env": {}, "paths": {}, "kernel": [], "step": [], "errors": [],
                           "missing_paths": [], "goals": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))

    def missing(self, what: str) -> None:
        print(f"MISSING GPU PATH: {what}", flush=True)
        self.data["missing_paths"].append(what)
        self.save()

    @contextlib.contextmanager
    def case(self, section: str, row: dict):
        """Run one case; on error record it in the row and in errors, and go on."""
        release_memory()
        started = time.perf_counter()
        try:
            yield row
        except Exception as error:  # noqa: BLE001 - a benchmark case must not stop the run
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
            self.data["errors"].append({"section": section, "case": {k: v for k, v in row.items() if k != "error"},
                                        "error": row["error"], "traceback": traceback.format_exc()[-4000:]})
        finally:
            row["wall_s"] = round(time.perf_counter() - started, 2)
            self.data[section].append(row)
            print(json.dumps(row), flush=True)
            self.save()
            release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


WARMUP = 1


def time_ms(step, repeats: int) -> float:
    """Median wall time of step() in ms after warm-up; CUDA events on a GPU, perf_counter otherwise."""
    for _ in range(WARMUP):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def peak_memory_gib(step) -> float | None:
    if not torch.cuda.is_available():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


class KernelCalls:
    """Counts calls of torch's varlen_attn and flash-attn's flash_attn_varlen_func, signatures kept."""

    def __init__(self):
        self.counts = {"varlen": 0, "flash": 0}
        self._undo = []
        varlen_module = sys.modules.get("torch.nn.attention.varlen")
        if varlen_module is not None and hasattr(varlen_module, "varlen_attn"):
            self._wrap(varlen_module, "varlen_attn", "varlen")
        if flash_attn_available():
            import flash_attn as flash  # noqa: F811

            self._wrap(flash, "flash_attn_varlen_func", "flash")

    def _wrap(self, module, name: str, key: str) -> None:
        real = getattr(module, name)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            self.counts[key] += 1
            return real(*args, **kwargs)

        setattr(module, name, counted)
        self._undo.append((module, name, real))

    def restore(self) -> None:
        for module, name, real in reversed(self._undo):
            setattr(module, name, real)


def install_emulations() -> None:
    """Dry run without CUDA: the kernel backends run through the test emulations (torch 2.11 signature)."""
    import torch.nn.attention.varlen as torch_varlen

    from tests.helpers import kernel_emulations

    shifted_sparse._kernels_run_on = lambda tensor: True
    torch_varlen.varlen_attn = kernel_emulations.make_torch_varlen_attn("2.11")


def versions(device: str) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "device": device,
            "flash_attn_varlen_func_imports": flash_attn_available(), "torch_varlen_attn": torch_varlen_available()}
    for name in ("peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch_varlen_available():
        from torch.nn.attention.varlen import varlen_attn

        info["varlen_attn_parameters"] = list(inspect.signature(varlen_attn).parameters)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- 1. paths ----------------------------------------------------------------------------------------------------------


def check_paths(run: Run, device: str, shape: dict) -> None:
    """auto on device bf16 must pick flash (when it imports) or torch varlen, and that kernel must run."""
    paths = run.data["paths"]
    if device != "cuda" and not run.data["dry_run"]:
        run.missing("CUDA is not available")
    if not torch_varlen_available():
        run.missing(f"torch.nn.attention.varlen.varlen_attn is missing in torch {torch.__version__}")
        return
    expected = "flash" if flash_attn_available() else "varlen"
    q = torch.randn(1, shape["heads"], 256, shape["head_dim"], device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn_like(q).requires_grad_() for _ in range(2))
    # Packed documents take the kernel under auto; whole-document rows stay on SDPA (faster, see _choose_backend).
    layer = dict(scaling=None, dropout=0.0, softcap=None, sliding_window=None)
    chosen = shifted_sparse._choose_backend("auto", q, k, **layer)
    paths["auto_choice_bf16_mha_packed"] = chosen
    paths["auto_choice_bf16_mha_whole_rows"] = shifted_sparse._choose_backend("auto", q, k, rows_are_documents=True, **layer)
    if chosen != expected:
        run.missing(f"auto chose {chosen!r} on {device} bf16, expected {expected!r}")
    calls = KernelCalls()
    packed = torch.tensor([0, 100, 256], dtype=torch.int32, device=device)
    try:
        s2_attention(q, k, v, group_size=64, cu_seqlens=packed).sum().backward()
        synchronize()
    finally:
        calls.restore()
    paths["auto_kernel_calls"] = dict(calls.counts)
    if calls.counts[expected] == 0:
        run.missing(f"auto did not call the {expected} kernel on {device} bf16")
    for backend in ("varlen", "flash"):
        gaps = shifted_sparse.backend_gaps(backend, q, k, scaling=q.shape[-1] ** -0.5)
        paths[f"{backend}_gaps_bf16_mha"] = gaps
        gqa_k = k[:, : max(1, shape["heads"] // 4)]
        paths[f"{backend}_gaps_bf16_gqa"] = shifted_sparse.backend_gaps(backend, q, gqa_k, scaling=q.shape[-1] ** -0.5)
    if paths["varlen_gaps_bf16_mha"]:
        run.missing("torch varlen cannot serve a bf16 MHA layer: " + "; ".join(paths["varlen_gaps_bf16_mha"]))
    run.save()


# --- 2. kernel ---------------------------------------------------------------------------------------------------------


def _full_varlen(q_tok, k_tok, v_tok, cu, longest):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k_tok.shape[1] != q_tok.shape[1]:
        extra["enable_gqa"] = True
    return varlen_attn(q_tok, k_tok, v_tok, cu, cu, longest, longest, **extra)


def kernel_case(run: Run, device: str, seq_len: int, shape: dict, repeats: int, documents: list[int] | None, tol: float):
    """One kernel row: S2 per backend and full causal attention, fwd+bwd, and S2 outputs/grads vs the SDPA path."""
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    row = {"N": seq_len, "B": 1, "H": heads, "H_kv": kv_heads, "D": head_dim, "G": seq_len // 4,
           "documents": documents, "dtype": "bfloat16", "timing": "fwd+bwd median ms"}
    with run.case("kernel", row):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(1, kv_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        cu = None
        if documents:
            cu = torch.tensor([0, *torch.tensor(documents).cumsum(0).tolist()], dtype=torch.int32, device=device)
            assert int(cu[-1]) == seq_len, (documents, seq_len)
        group = seq_len // 4

        def clear():
            for x in (q, k, v):
                x.grad = None

        def s2(backend):
            def step():
                clear()
                s2_attention(q, k, v, group_size=group, cu_seqlens=cu, backend=backend).backward(grad)
            return step

        def full_sdpa():
            clear()
            if cu is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
            else:  # full causal attention inside each packed document
                bounds = cu.tolist()
                out = torch.cat([
                    F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                   enable_gqa=kv_heads != heads)
                    for a, b in zip(bounds[:-1], bounds[1:])
                ], dim=2)
            out.transpose(1, 2).backward(grad)

        def full_varlen():
            clear()
            tokens = [x[0].transpose(0, 1) for x in (q, k, v)]  # (N, h, D)
            cu_full = cu if cu is not None else torch.tensor([0, seq_len], dtype=torch.int32, device=device)
            longest = int((cu_full[1:] - cu_full[:-1]).max())
            _full_varlen(*tokens, cu_full, longest).unsqueeze(0).backward(grad)

        steps = {"s2_sdpa": s2("sdpa"), "full_sdpa": full_sdpa}
        kernels = []
        for backend in ("varlen", "flash"):
            gaps = shifted_sparse.backend_gaps(backend, q, k, scaling=head_dim**-0.5)
            row[f"{backend}_gaps"] = gaps
            if not gaps:
                kernels.append(backend)
                steps[f"s2_{backend}"] = s2(backend)
        if "varlen" in kernels:
            steps["full_varlen"] = full_varlen
        if "flash" in kernels and cu is None:
            from flash_attn import flash_attn_func

            def full_flash():
                clear()
                flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), causal=True).backward(grad)

            steps["full_flash"] = full_flash
        for name, step in steps.items():
            try:
                row[f"{name}_ms"] = time_ms(step, repeats)
            except Exception as error:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
                run.data["errors"].append({"section": "kernel", "N": seq_len, "step": name, "error": row[f"{name}_error"]})
            release_memory()
        # Correctness: each kernel's S2 output and gradients against the SDPA path.
        reference = _s2_outputs(q, k, v, grad, group, cu, "sdpa")
        for backend in kernels:
            ours = _s2_outputs(q, k, v, grad, group, cu, backend)
            errors = {n: round(float((a.float() - b.float()).abs().max()), 5) for n, a, b in zip(("out", "dq", "dk", "dv"), ours, reference)}
            scale = {n: float(b.float().abs().max()) for n, b in zip(("out", "dq", "dk", "dv"), reference)}
            row[f"s2_{backend}_max_abs_err_vs_sdpa"] = errors
            row[f"s2_{backend}_matches_sdpa"] = all(errors[n] <= tol * max(1.0, scale[n]) for n in errors)
            if not row[f"s2_{backend}_matches_sdpa"]:
                run.missing(f"S2 {backend} disagrees with the SDPA path at N={seq_len}: {errors}")
            del ours
        del reference
        for s2_name, full_name in (("s2_sdpa", "full_sdpa"), ("s2_varlen", "full_sdpa"), ("s2_varlen", "full_varlen"),
                                   ("s2_flash", "full_flash"), ("s2_flash", "full_sdpa")):
            if f"{s2_name}_ms" in row and f"{full_name}_ms" in row:
                row[f"speedup_{s2_name}_vs_{full_name}"] = round(row[f"{full_name}_ms"] / row[f"{s2_name}_ms"], 2)
        if not documents and kv_heads == heads and "varlen" not in kernels:
            run.missing(f"torch varlen did not run in the kernel benchmark at N={seq_len}: {row['varlen_gaps']}")
        if not documents and kv_heads == heads and "s2_varlen_ms" not in row:
            run.missing(f"S2 varlen failed in the kernel benchmark at N={seq_len}")


def _s2_outputs(q, k, v, grad, group, cu, backend):
    for x in (q, k, v):
        x.grad = None
    out = s2_attention(q, k, v, group_size=group, cu_seqlens=cu, backend=backend)
    out.backward(grad)
    result = (out.detach(), q.grad, k.grad, v.grad)
    for x in (q, k, v):
        x.grad = None
    return result


# --- 3. 7B-shaped training step ------------------------------------------------------------------------------------------


def build_slice(dims: dict, layers: int, attention: str, backend: str | None, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longlora_plugin  # noqa: F401 - registers s2_attention

    config = LlamaConfig(**dims, num_hidden_layers=layers, max_position_embeddings=131072, use_cache=False)
    if backend is not None:
        longlora_plugin.configure_s2(config, group_size_ratio=0.25, backend=backend)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert model.base_model.model.config._attn_implementation == attention
    return model.train()


def step_case(run: Run, device: str, dims: dict, layers: int, seq_len: int, variant: str, repeats: int):
    attention, backend = ("sdpa", None) if variant == "full_sdpa" else ("s2_attention", variant.removeprefix("s2_"))
    row = {"N": seq_len, "layers": layers, "variant": variant, "dims": "llama2-7b" if dims is LLAMA2_7B_SLICE else "dry",
           "training": "LoRA r=8 on q/k/v/o, fwd+bwd+SGD step", "dtype": "bfloat16"}
    with run.case("step", row):
        model = build_slice(dims, layers, attention, backend, device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(3, dims["vocab_size"], (1, seq_len), device=device,
                            generator=torch.Generator(device=device).manual_seed(1))

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        calls = KernelCalls()
        try:
            row["step_ms"] = time_ms(step, repeats)
            row["peak_memory_gib"] = peak_memory_gib(step)
        finally:
            calls.restore()
        row["kernel_calls"] = dict(calls.counts)
        if backend in ("varlen", "flash") and calls.counts[backend] == 0:
            run.missing(f"the 7B-slice step with s2_backend={backend!r} never called the {backend} kernel")
        if backend == "auto" and any(calls.counts.values()):  # one whole row: auto stays on the faster SDPA path
            run.missing(f"the 7B-slice step with s2_backend='auto' called a varlen kernel: {dict(calls.counts)}")
        del model, optimizer
    if "error" in row and backend is not None:
        run.missing(f"the 7B-slice step with s2_backend={backend!r} failed at N={seq_len}: {row['error'][:300]}")


def summarize(run: Run) -> None:
    goals = run.data["goals"]
    for row in run.data["kernel"]:
        if row.get("documents") or row["H_kv"] != row["H"]:
            continue
        for key in ("speedup_s2_varlen_vs_full_varlen", "speedup_s2_varlen_vs_full_sdpa", "speedup_s2_sdpa_vs_full_sdpa",
                    "speedup_s2_flash_vs_full_flash"):
            if key in row:
                goals[f"kernel_{row['N']}_{key}"] = row[key]
    steps = {(r["N"], r["layers"], r["variant"]): r for r in run.data["step"] if "step_ms" in r}
    for (n, layers, variant), r in sorted(steps.items()):
        base = steps.get((n, layers, "full_sdpa"))
        if base and variant != "full_sdpa":
            r["speedup_vs_full_sdpa"] = round(base["step_ms"] / r["step_ms"], 2)
            goals[f"step_{n}_{layers}layers_{variant}_vs_full_sdpa"] = r["speedup_vs_full_sdpa"]
    goals["targets"] = "kernel >= 3.5x S2 vs full at 64k; 7B-slice step >= 1.8x at 64k"
    run.save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("LONGLORA_DRY_RUN") == "1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-step", action="store_true", help="kernel rows only")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = Run(Path(args.out), dry)
    if dry and device == "cpu":
        install_emulations()
    run.data["env"] = versions(device)
    print(json.dumps(run.data["env"]), flush=True)

    kernel_shape, gqa_shape = (DRY_KERNEL_SHAPE, DRY_GQA_SHAPE) if dry else (KERNEL_SHAPE, GQA_SHAPE)
    kernel_lengths = [128, 256] if dry else [32768, 65536]
    gqa_case = (256, [100, 80, 50, 26]) if dry else (65536, [30000, 20000, 10000, 5536])
    dims, step_lengths = (DRY_SLICE, [128, 256, 384]) if dry else (LLAMA2_7B_SLICE, [32768, 65536, 102400])
    repeats = 1 if dry else args.repeats
    global WARMUP
    WARMUP = 0 if dry else 1
    tol = 3e-2

    check_paths(run, device, kernel_shape)
    for n in kernel_lengths:
        kernel_case(run, device, n, kernel_shape, repeats, None, tol)
    kernel_case(run, device, gqa_case[0], kernel_shape, repeats, gqa_case[1], tol)  # packed MHA: varlen vs SDPA
    kernel_case(run, device, gqa_case[0], gqa_shape, repeats, gqa_case[1], tol)
    if not args.skip_step:
        variants = ["full_sdpa", "s2_sdpa", "s2_varlen", "s2_auto"] + (["s2_flash"] if flash_attn_available() else [])
        for n in step_lengths:
            for variant in variants:
                step_case(run, device, dims, 2, n, variant, repeats)
        middle = step_lengths[1]
        for variant in ("full_sdpa", "s2_sdpa", "s2_varlen"):  # 4 layers at 64k: per-layer cost, as in the full model
            step_case(run, device, dims, 4, middle, variant, repeats)
    summarize(run)
    print(json.dumps({"goals": run.data["goals"], "missing_paths": run.data["missing_paths"],
                      "errors": [e.get("error") for e in run.data["errors"]]}, indent=2), flush=True)
    if run.data["missing_paths"]:
        print(f"FAIL: {len(run.data['missing_paths'])} GPU path(s) did not run as they should", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
