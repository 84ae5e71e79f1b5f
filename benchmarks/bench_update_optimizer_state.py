"""Training-state memory of preserve-update masks: dense gradients vs `--optimizer-slices on` (issue 11, item 1).

Measures, on the embedded SmolLM2-135M (full fine-tuning, CPU, fp32, AdamW), in one run: plain full FT, preserve-update
with dense gradients (`--optimizer-slices off`: AdamW state for whole MLP tensors, a guard snapshot of the frozen
slices) and preserve-update with slice deltas (`on`: dense MLP weights frozen, state for the trained slices only).
Counted in bytes after a few optimizer steps: AdamW state, gradients, the guard's snapshot and the delta parameters.
Also prints the mean step time (forward, backward, optimizer step; 2-core shared CPU: indicative only).

    python benchmarks/bench_update_optimizer_state.py --kept 0.1
"""

import argparse
import time

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from fnscale.config import TrainConfig
from fnscale.masking.setup import setup_masks
from fnscale.models import loading
from fnscale.models.mlp import find_mlp_layers
from fnscale.networks.templates import Templates
from fnscale.recipes.train import make_optimizer

MIB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model, masker=None, steps: int = 3) -> dict[str, float]:
    """MiB of training state after `steps` AdamW steps on random tokens, and the mean step time in seconds."""
    optimizer = make_optimizer(model, 1e-4, 0.01, masker.no_decay_params() if masker else None)
    if masker is not None:
        masker.bind_optimizer(optimizer)
    torch.manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 64))
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if masker is not None:
            masker.after_step()
        times.append(time.perf_counter() - t0)
        grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.zero_grad(set_to_none=True)
    state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    guard = masker.guard.num_protected() * 4 if masker is not None and masker.guard is not None else 0
    deltas = tensor_bytes(masker.deltas.parameters()) if masker is not None and masker.deltas is not None else 0
    out = {
        "optimizer state": state / MIB,
        "gradients": grads / MIB,
        "guard snapshot": guard / MIB,
        "slice deltas": deltas / MIB,
    }
    out["total"] = sum(out.values())
    out["step s"] = float(np.mean(times[1:] or times))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--kept", type=float, default=0.1, help="share of MLP neurons per layer that preserve-update trains"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="/tmp/bench_update_tpl.json")
    args = parser.parse_args()
    path = loading.resolve_model(None).path
    tok = AutoTokenizer.from_pretrained(path)
    layers = find_mlp_layers(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    width, rng = layers[0].width, np.random.default_rng(0)
    chosen = {layer.index: rng.choice(width, size=int(args.kept * width), replace=False) for layer in layers}
    Templates(layers=list(chosen), neurons_per_layer=width, components={0: chosen}, num_layers=len(layers)).save(
        args.output
    )

    rows = {}
    for name, slices in (
        ("plain full FT", None),
        ("preserve-update, dense (off)", "off"),
        ("preserve-update, slices (on)", "on"),
    ):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fresh weights for each configuration
        masker = None
        if slices is not None:
            cfg = TrainConfig(
                mask_mode="preserve",
                mask_effect="update",
                ica_template_path=args.output,
                ica_component_ids="0",
                optimizer_slices=slices,
            )
            masker = setup_masks(cfg, model, tok, None, Accelerator(cpu=True), "SmolLM2-135M-Instruct")
        rows[name] = measure(model, masker, args.steps)
        del model, masker

    n_params = sum(layer.width * layer.hidden * 3 for layer in layers)
    print(
        f"SmolLM2-135M, fp32 AdamW, kept share {args.kept:.0%} of MLP neurons per layer ({n_params / 1e6:.1f} M MLP "
        "weights)"
    )
    keys = ["optimizer state", "gradients", "guard snapshot", "slice deltas", "total"]
    print(f"{'MiB':32s}" + "".join(f"{k:>17s}" for k in keys) + f"{'step s':>9s}")
    for name, row in rows.items():
        print(f"{name:32s}" + "".join(f"{row[k]:17.1f}" for k in keys) + f"{row['step s']:9.2f}")
    dense, sliced = rows["preserve-update, dense (off)"], rows["preserve-update, slices (on)"]
    print(
        f"slices vs dense preserve-update: optimizer state {sliced['optimizer state'] / dense['optimizer state']:.3f}x "
        f"({dense['optimizer state'] - sliced['optimizer state']:.1f} MiB saved), training state total "
        f"{sliced['total'] / dense['total']:.3f}x ({dense['total'] - sliced['total']:.1f} MiB saved), step time "
        f"{sliced['step s'] / dense['step s']:.2f}x"
    )


if __name__ == "__main__":
    main()
