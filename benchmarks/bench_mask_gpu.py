"""GPU cost of the intermediate-neuron mask on Llama-3.2-1B MLP shapes, bf16, forward + backward.

Two levels, timed with CUDA events (median of --iters after --warmup):
- activation op: eager `silu(gate) * up * mask` (three kernels, the hook path's work) vs the fused
  Triton kernel, and eager unmasked `silu(gate) * up`;
- whole MLP (gate/up/down matmuls included) through fnscale.masking.apply_masks: eager unmasked,
  eager + pre-hook (kernel="torch"), fused (kernel="triton").
Also reports the activation memory each MLP variant keeps for backward.

    python benchmarks/bench_mask_gpu.py                # needs CUDA
    python benchmarks/bench_mask_gpu.py --smoke        # CPU, TRITON_INTERPRET=1, tiny shapes: checks it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

TARGETS = "targets: fused >= 1.3x faster than eager+hook; masked/unmasked <= 1.02"


def timer(fn, iters: int, warmup: int, device: str, reset=lambda: None) -> float:
    """Median milliseconds of fn() (reset() runs untimed before each call)."""
    for _ in range(warmup):
        reset()
        fn()
    samples = []
    for _ in range(iters):
        reset()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def saved_bytes(fn, device: str) -> int:
    """Bytes still allocated after a forward (what autograd keeps for backward)."""
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    del out
    return kept


def time_activation_ops(args, n, width, mask, device, dtype, fused_op) -> dict[str, float]:
    """The activation op alone: eager silu*up, eager with the mask multiply (the hook's cost), fused Triton."""
    gate = torch.randn(n, width, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(n, width, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, width, device=device, dtype=dtype)

    def reset_op():
        gate.grad = up.grad = None

    ops = {
        "eager silu*up (unmasked)": lambda: (F.silu(gate) * up).backward(dy),
        "eager silu*up*mask (hook)": lambda: (F.silu(gate) * up * mask).backward(dy),
        "fused Triton": lambda: fused_op(gate, up, mask, "silu").backward(dy),
    }
    return {name: timer(fn, args.iters, args.warmup, device, reset_op) for name, fn in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--lesion", type=float, default=0.02, help="share of neurons masked")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1 + tiny shapes; timings meaningless"
    )
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        args.hidden, args.intermediate, args.tokens, args.iters, args.warmup = 64, 256, 128, 3, 1
        device, dtype = "cpu", torch.float32
    elif not torch.cuda.is_available():
        sys.exit("bench_mask_gpu.py needs CUDA and found none; on CPU run benchmarks/bench_mask_cpu.py")
    else:
        device, dtype = "cuda", torch.bfloat16

    from transformers import LlamaConfig, LlamaForCausalLM

    from fnscale.kernels import triton_gated_act_mul_mask
    from fnscale.masking import apply_masks, build_masks

    torch.manual_seed(0)
    n, h, width = args.tokens, args.hidden, args.intermediate
    g = torch.Generator().manual_seed(1)
    masked = torch.randperm(width, generator=g)[: max(1, round(args.lesion * width))].tolist()
    masks = build_masks({0: masked}, "lesion", 1, width)
    mask = masks[0].to(device, dtype)
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}; tokens {n}, hidden {h}, "
        f"intermediate {width}, {dtype}, {len(masked)} neurons masked ({args.lesion:.0%}); median of {args.iters}"
    )

    op_ms = time_activation_ops(args, n, width, mask, device, dtype, triton_gated_act_mul_mask)

    # Whole MLP through apply_masks.
    config = LlamaConfig(
        hidden_size=h,
        intermediate_size=width,
        num_hidden_layers=1,
        num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 256),
        vocab_size=256,
    )
    model = LlamaForCausalLM(config).to(device, dtype)
    mlp = model.model.layers[0].mlp
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, h, device=device, dtype=dtype)

    def reset_mlp():
        x.grad = None
        mlp.zero_grad(set_to_none=True)

    mlp_ms, mlp_saved = {}, {}
    for name, kernel in (
        ("eager MLP (unmasked)", None),
        ("eager MLP + hook", "torch"),
        ("fused MLP (Triton)", "triton"),
    ):
        handle = apply_masks(model, masks, kernel=kernel, compact=False) if kernel else None
        assert handle is None or handle.paths[0] == {"torch": "hook", "triton": "triton"}[kernel]
        mlp_ms[name] = timer(lambda: mlp(x).backward(dy), args.iters, args.warmup, device, reset_mlp)
        mlp_saved[name] = saved_bytes(lambda: mlp(x), device)
        if handle is not None:
            handle.remove()

    def table(title, ms, baseline, masked_eager, fused, saved=None):
        print(f"\n{title}")
        print(
            f"  {'variant':<28}{'ms':>9}{'vs unmasked':>13}{'speedup vs hook':>17}"
            + ("  saved for bwd" if saved else "")
        )
        for name, value in ms.items():
            extra = f"{saved[name] / 2**20:>12.0f} MiB" if saved else ""
            print(f"  {name:<28}{value:>9.3f}{value / ms[baseline]:>13.3f}{ms[masked_eager] / value:>17.2f}{extra}")
        print(
            f"  fused vs eager+hook: {ms[masked_eager] / ms[fused]:.2f}x faster; "
            f"eager+hook / unmasked: {ms[masked_eager] / ms[baseline]:.3f}; fused / unmasked: "
            f"{ms[fused] / ms[baseline]:.3f}"
        )

    table(
        "activation op, forward + backward",
        op_ms,
        "eager silu*up (unmasked)",
        "eager silu*up*mask (hook)",
        "fused Triton",
    )
    table(
        "whole MLP, forward + backward",
        mlp_ms,
        "eager MLP (unmasked)",
        "eager MLP + hook",
        "fused MLP (Triton)",
        mlp_saved if device == "cuda" else None,
    )
    print(f"\n{TARGETS}")


if __name__ == "__main__":
    main()
