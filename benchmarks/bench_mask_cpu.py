"""CPU train-step cost of masking (torch path), from one run.

Compares, on the same model and batch, full fine-tuning steps (forward + backward + AdamW) of:
unmasked; lesion of ~2% of MLP neurons (pre-hook path); preserve keeping 10% (compact MLP). The
guard's restore() is timed on its own (it is needed before saving, optionally after every step).
Configurations run round-robin (one step each, in rotating order) so drifting load hits them alike;
ratios are medians of per-round ratios to unmasked. Times are this process's CPU time (steadier than
wall time on a shared machine), with wall time beside them.

Default model: a randomly initialised Llama with SmolLM2-135M's shapes (runs offline). Example:
    python benchmarks/bench_mask_cpu.py --steps 5 --seq 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fnscale.masking import apply_masks, build_masks, find_mlp_layers, protect_masked_weights
from fnscale.recipes.train import make_optimizer

TARGETS = {"lesion": ("<= 1.02", 1.02), "preserve": ("<= 0.6", 0.6)}


def load_model(path: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(  # SmolLM2-135M
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def random_neurons(num_layers: int, width: int, share: float, seed: int) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(share * width))
    return {i: torch.randperm(width, generator=g)[:count].tolist() for i in range(num_layers)}


def train_step(model, ids, optimizer) -> tuple[float, float, float]:
    """(CPU s of the whole step, CPU s of forward + backward, wall s of the whole step). CPU time is this
    process's: other load on a shared machine stretches wall time much more than CPU time."""
    wall, start = time.perf_counter(), time.process_time()
    model(input_ids=ids, labels=ids).loss.backward()
    middle = time.process_time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - start, middle - start, time.perf_counter() - wall


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model id or folder (default: random Llama with SmolLM2-135M shapes)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (rounds) per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest CPU times)")
    parser.add_argument("--mlp-rounds", type=int, default=40, help="rounds of the MLP-alone timing")
    parser.add_argument("--lesion", type=float, default=0.02, help="share of MLP neurons removed in lesion")
    parser.add_argument("--preserve", type=float, default=0.10, help="share of MLP neurons kept in preserve")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model).train()
    layers = find_mlp_layers(model)
    n, width = len(layers), layers[0].width
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    optimizer = make_optimizer(model, 1e-5, 0.1)  # the training loop's optimizer (fused AdamW, decay groups)
    masks = {
        "lesion": build_masks(random_neurons(n, width, args.lesion, 1), "lesion", n, width),
        "preserve": build_masks(random_neurons(n, width, args.preserve, 2), "preserve", n, width),
    }
    guards = {name: protect_masked_weights(model, m) for name, m in masks.items()}
    configs = ["unmasked", "lesion", "preserve"]
    times: dict[str, list[tuple[float, float, float]]] = {c: [] for c in configs}
    paths: dict[str, str] = {"unmasked": "-"}
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.model or 'random Llama, SmolLM2-135M shapes'} ({params / 1e6:.0f}M params, {n} layers, "
        f"MLP width {width}); batch {args.batch} x seq {args.seq}; torch threads {torch.get_num_threads()}"
    )
    for rep in range(args.warmup + args.steps):
        for name in configs[rep % 3 :] + configs[: rep % 3]:  # rotate the order: no config always runs first
            handle = apply_masks(model, masks[name], kernel="torch") if name in masks else None
            if handle is not None:
                paths[name] = ",".join(sorted(set(handle.paths.values())))
            elapsed = train_step(model, ids, optimizer)
            if handle is not None:
                handle.remove()
            if rep >= args.warmup:
                times[name].append(elapsed)
        if rep >= args.warmup:
            print(
                f"  round {rep + 1 - args.warmup}/{args.steps}: "
                + ", ".join(f"{c} {t[-1][0]:.2f}s" for c, t in times.items())
                + " (cpu)",
                flush=True,
            )
    restore = {name: statistics.median(cpu_seconds(g.restore) for _ in range(3)) for name, g in guards.items()}

    def paired(name: str, i: int) -> float:
        """Median over rounds of this config's time / unmasked time in the same round (cancels drift)."""
        return statistics.median(a[i] / b[i] for a, b in zip(times[name], times["unmasked"]))

    labels = {
        "unmasked": "unmasked full FT",
        "lesion": f"lesion {args.lesion:.0%}",
        "preserve": f"preserve {args.preserve:.0%} kept",
    }
    print("\nmedian per train step (forward + backward + AdamW); ratio = median of per-round ratios to unmasked")
    print(
        f"{'configuration':<22}{'path':<9}{'cpu s':>7}{'ratio':>7}"
        f"{'fwd+bwd s':>10}{'ratio':>7}{'wall s':>8}{'ratio':>7}"
        f"{'restore s':>10}  target (cpu ratio)"
    )
    for name in configs:
        cpu, fb, wall = (statistics.median(t[i] for t in times[name]) for i in range(3))
        target = TARGETS.get(name)
        verdict = "" if target is None else f"{target[0]} ({'met' if paired(name, 0) <= target[1] else 'NOT met'})"
        rest = f"{restore[name]:>10.3f}" if name in restore else f"{'-':>10}"
        print(
            f"{labels[name]:<22}{paths[name]:<9}{cpu:>7.2f}{paired(name, 0):>7.3f}{fb:>10.2f}{paired(name, 1):>7.3f}"
            f"{wall:>8.2f}{paired(name, 2):>7.3f}{rest}  {verdict}"
        )
    print("restore s: one guard.restore() (CPU s), paid before each save, or per step if called every step")
    mlp_alone(model, masks, args, labels)


def mlp_alone(model, masks, args, labels) -> None:
    """Layer 0's MLP alone, forward + backward, many rounds: resolves the small overhead of the hook that
    whole-step times on a shared CPU cannot."""
    mlp = find_mlp_layers(model)[0].mlp
    hidden = model.config.hidden_size
    x = torch.randn(args.batch, args.seq, hidden, requires_grad=True)
    dy = torch.randn(args.batch, args.seq, hidden)
    times: dict[str, list[float]] = {c: [] for c in labels}

    def run():
        mlp(x).backward(dy)

    for rep in range(args.mlp_rounds + 2):
        for name in list(labels)[rep % 3 :] + list(labels)[: rep % 3]:
            handle = apply_masks(model, masks[name], kernel="torch") if name in masks else None
            elapsed = cpu_seconds(run)
            x.grad = None
            model.zero_grad(set_to_none=True)
            if handle is not None:
                handle.remove()
            if rep >= 2:
                times[name].append(elapsed)
    print(f"\nlayer-0 MLP alone, forward + backward, median of {args.mlp_rounds} rounds (cpu ms)")
    for name in labels:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["unmasked"]))
        print(f"{labels[name]:<22}{statistics.median(times[name]) * 1e3:>9.2f} ms{ratio:>8.3f}")


if __name__ == "__main__":
    main()
