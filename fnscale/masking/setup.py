"""Masks for training: from templates, build masks on the main process, broadcast them,
apply them on every rank, and keep masked neurons' weights untouched.

Untouched under each distribution mode:
- single device, DDP, ZeRO-2: `MaskedWeightGuard` snapshots the masked slices and restores them after
  every optimizer step (robust to weight decay and any optimizer); LoRA slices are held at zero.
- ZeRO-3 (parameters are partitioned, slices cannot be written): masked slices get exactly zero
  gradient, LoRA slices start at zero, and the MLP tensors holding masked slices get no weight decay,
  so AdamW leaves them exactly where they were.
Masks act on the forward pass (`--mask-effect forward`: activations zeroed, so gradients are zero too) or
on the update only (`update`, the default: gradient hooks zero the masked slices' gradients, see `update`).
Update masks under full fine-tuning on one device or DDP may instead freeze the masked layers' dense MLP weights
and train deltas of the trained slices only (`--optimizer-slices`, see `slices`): AdamW then keeps state for
those alone. ZeRO keeps the dense approach (its partitioned flat buffers are built from the dense parameters).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fnscale.errors import UsageError
from fnscale.masking.apply import apply_masks
from fnscale.masking.build import build_masks
from fnscale.masking.guard import MaskedWeightGuard, masked_slices
from fnscale.masking.slices import SliceDeltas
from fnscale.masking.update import GradientHold
from fnscale.models.mlp import find_mlp_layers, unwrap
from fnscale.networks.controls import random_like
from fnscale.networks.templates import Templates
from fnscale.preflight import parse_component_ids, parse_layers
from fnscale.runtime.distributed import broadcast_from_main, uses_deepspeed, zero_stage

log = logging.getLogger(__name__)


class Masker:
    """The training loop's view of masking: attach after `prepare`, `after_step` after each optimizer step."""

    def __init__(
        self,
        masks: dict[int, torch.Tensor],
        site: str,
        kernel: str,
        compact: bool | None,
        guard,
        zero3: bool,
        decay_free: set[int],
        hold: GradientHold | None = None,
        deltas: SliceDeltas | None = None,
    ):
        self.masks, self.site, self.kernel, self.compact = masks, site, kernel, compact
        self.guard, self.zero3, self._decay_free = guard, zero3, decay_free
        self.hold = hold  # update masks: gradient hooks, on from setup; forward masks: None, hooks go on in `attach`
        self.deltas = deltas  # --optimizer-slices: trained-slice deltas of frozen dense weights, folded in by `remove`
        self.handle = None

    def no_decay_params(self) -> set[int]:
        """Parameters AdamW must not decay: ZeRO-3's masked tensors, and the slice deltas (decayed by
        `bind_optimizer`)."""
        return self._decay_free | ({id(p) for p in self.deltas.parameters()} if self.deltas is not None else set())

    def bind_optimizer(self, optimizer) -> None:
        """Hook the (unprepared) torch optimizer where masks need it: the slice deltas' weight decay."""
        if self.deltas is not None:
            self.deltas.bind(optimizer)

    def attach(self, model) -> None:
        if self.hold is not None:
            return
        self.handle = apply_masks(
            model, self.masks, site=self.site, kernel=self.kernel, compact=False if self.zero3 else self.compact
        )

    def after_step(self) -> None:
        if self.guard is not None and not self.zero3:
            self.guard.restore()

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.hold is not None:
            self.hold.remove()
        if self.deltas is not None:
            self.deltas.fold()
        self.after_step()

    def stats(self) -> dict[str, float]:
        per_layer = {layer: int((m == 0).sum()) for layer, m in sorted(self.masks.items())}
        total = sum(m.numel() for m in self.masks.values())
        out = {f"masked_neurons/layer_{layer}": n for layer, n in per_layer.items()}
        out["masked_neurons/total"] = sum(per_layer.values())
        out["masked_neurons/share_of_masked_layers"] = sum(per_layer.values()) / max(1, total)
        if self.deltas is not None:
            trained, dense = self.deltas.numel()
            out["optimizer_slices/trained_share"] = trained / max(1, dense)
        return out


def setup_masks(cfg, model, accelerator, templates: Templates) -> Masker:
    """Everything before `accelerator.prepare`: masks (main process, broadcast), weight guard, gradient holds.

    `templates`: loaded from --ica-template-path or computed in the run by the train recipe."""
    ids = parse_component_ids(cfg.ica_component_ids, templates)
    layers = find_mlp_layers(model)
    site = templates.site
    width = layers[0].width if site == "intermediate" else layers[0].hidden
    templates.check_compatible(len(layers), width, site)

    masks = None
    if accelerator.is_main_process:
        neurons = templates.component_neurons(ids)
        if cfg.mask_control == "random":
            neurons = random_like(neurons, width, cfg.seed if cfg.mask_control_seed is None else cfg.mask_control_seed)
        chosen = parse_layers(cfg.ica_layers, len(layers)) if cfg.ica_layers else None
        masks = {k: v.cpu() for k, v in build_masks(neurons, cfg.mask_mode, len(layers), width, layers=chosen).items()}
    masks = broadcast_from_main(masks, accelerator)

    zero3 = zero_stage(accelerator) == 3
    lora = hasattr(model, "peft_config")
    effect = cfg.mask_effect or "update"
    kept = float(np.mean([float(m.mean()) for m in masks.values()]))
    deltas = None
    if _use_slices(
        cfg.optimizer_slices, effect, lora, uses_deepspeed(accelerator), kept
    ):  # before the guard: frozen weights need no snapshot
        deltas = SliceDeltas(model, masks, site, cfg.weight_decay)
    # The guard zeroes LoRA slices now, before ZeRO partitions them. Under ZeRO-3 full fine-tuning the dense
    # weights are already partitioned and cannot be snapshotted: zero gradient + no decay keeps them instead.
    snapshot = lora or not zero3
    slices = masked_slices(model, masks, site, snapshot=snapshot) if snapshot or effect == "update" else []
    guard = MaskedWeightGuard(slices) if snapshot else None
    decay_free: set[int] = set()
    if zero3 and not lora:
        for index in masks:
            for module in [layers[index].down] + [m for m, _ in layers[index].ups]:
                base = unwrap(module)
                decay_free.update(id(p) for p in base.parameters(recurse=False) if p.requires_grad)
    compact = {"auto": None, "on": True, "off": False}[cfg.compact]
    hold = GradientHold(slices) if effect == "update" else None
    log.info(
        "masks: %s-%s%s, components %s on %d layers at site %s (%.1f%% of their neurons kept)%s",
        cfg.mask_mode,
        effect,
        " (random control)" if cfg.mask_control == "random" else "",
        ids,
        len(masks),
        site,
        100 * kept,
        "; optimizer state for the trained slices only" if deltas is not None else "",
    )
    return Masker(masks, site, cfg.mask_kernel, compact, guard, zero3, decay_free, hold, deltas)


def _use_slices(option: str, effect: str, lora: bool, deepspeed: bool, kept: float) -> bool:
    """--optimizer-slices: auto turns them on for update masks under full FT (no DeepSpeed) keeping under half the
    neurons."""
    if option == "on" and deepspeed:
        raise UsageError(
            "--optimizer-slices on is not supported under DeepSpeed (ZeRO shards the dense weights' optimizer state "
            "itself); drop it, or train on one device or with DDP"
        )
    if option == "off" or effect != "update" or lora or deepspeed:
        return False
    return option == "on" or kept < 0.5
