"""Optimizer memory of preserve-update masks today: AdamW keeps state for whole MLP tensors, kept share or not.

Measures, on the embedded SmolLM2-135M (full fine-tuning, CPU, one optimizer step), the AdamW state bytes
with and without preserve-update masks of a given kept share, and prints what a slice-only state (state for
the trained gate/up rows and down columns only) would hold: the saving still open (issue 11, item 1).

    python benchmarks/bench_update_optimizer_state.py --kept 0.1
"""

import argparse

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from fnscale import models
from fnscale.config import TrainConfig
from fnscale.masking.setup import setup_masks
from fnscale.mlp import find_mlp_layers
from fnscale.networks.templates import Templates
from fnscale.train import make_optimizer


def state_bytes(optimizer, params=None) -> int:
    keep = None if params is None else {id(p) for p in params}
    return sum(t.numel() * t.element_size() for p, s in optimizer.state.items() if keep is None or id(p) in keep
               for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def one_step(model, masker=None):
    optimizer = make_optimizer(model, 1e-4, 0.01, masker.no_decay_params() if masker else None)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    if masker is not None:
        masker.after_step()
    return optimizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kept", type=float, default=0.1, help="share of MLP neurons per layer that preserve-update trains")
    parser.add_argument("--output", default="/tmp/bench_update_tpl.json")
    args = parser.parse_args()
    path = models.resolve_model(None).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = find_mlp_layers(model)
    width, rng = layers[0].width, np.random.default_rng(0)
    chosen = {layer.index: rng.choice(width, size=int(args.kept * width), replace=False) for layer in layers}
    Templates(layers=list(chosen), neurons_per_layer=width, components={0: chosen}, num_layers=len(layers)).save(args.output)
    mlp_params = [p for layer in layers for p in layer.mlp.parameters()]
    mlp_numel = sum(p.numel() for p in mlp_params)

    plain = one_step(model)
    total, mlp = state_bytes(plain), state_bytes(plain, mlp_params)
    del plain
    cfg = TrainConfig(mask_mode="preserve", mask_effect="update", ica_template_path=args.output, ica_component_ids="0")
    masker = setup_masks(cfg, model, tok, None, Accelerator(cpu=True), "SmolLM2-135M-Instruct")
    masked = one_step(model, masker)
    masked_total, masked_mlp = state_bytes(masked), state_bytes(masked, mlp_params)
    slice_only = masked_mlp * args.kept
    print(f"model SmolLM2-135M: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, MLP {mlp_numel / 1e6:.1f} M; kept share {args.kept:.0%}")
    print(f"AdamW state, plain full FT:      total {total / 2**20:8.1f} MiB, MLP tensors {mlp / 2**20:8.1f} MiB")
    print(f"AdamW state, preserve-update now: total {masked_total / 2**20:8.1f} MiB, MLP tensors {masked_mlp / 2**20:8.1f} MiB "
          f"(ratio vs plain {masked_total / total:.3f})")
    print(f"slice-only state would hold for the MLPs {slice_only / 2**20:8.1f} MiB: {(masked_mlp - slice_only) / 2**20:.1f} MiB "
          f"({(masked_mlp - slice_only) / masked_total:.0%} of all optimizer state) not yet saved")
    print(f"guard snapshot of frozen slices: {masker.guard.num_protected() * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
