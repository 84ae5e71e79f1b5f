"""The untouched guarantee: masked neurons' weights stay exactly as they were (`protect_masked_weights`).

Zero gradient does not keep masked weights untouched: AdamW's weight decay still shrinks them, and
LoRA's down-projection A has columns for masked inputs that would leak once merged. See
`MaskedWeightGuard` for the mechanism.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fnscale.errors import UsageError
from fnscale.masking.build import check_masks
from fnscale.models.mlp import SITES, find_mlp_layers, linear_features, unwrap

_LORA_INITS = ("gaussian", "orthogonal", "eva")  # besides True/False: inits that leave base weights alone


@dataclass(eq=False)
class _Slice:
    name: str
    param: torch.Tensor
    dim: int
    index: torch.Tensor
    saved: torch.Tensor | None  # None: keep at zero (LoRA slices)
    offload: bool = False  # keep `saved` on the CPU

    def on_device(self) -> torch.Tensor:
        """The index on the parameter's device; unless offloaded, the snapshot follows the parameter there
        too (a guard made before `accelerator.prepare` moves the model to the GPU snapshots on the CPU)."""
        if self.index.device != self.param.device:
            self.index = self.index.to(self.param.device)
        if self.saved is not None and not self.offload and self.saved.device != self.param.device:
            self.saved = self.saved.to(self.param.device)
        return self.index


class MaskedWeightGuard:
    """Keeps the weights of masked neurons exactly as they were when the guard was made.

    Mechanism (chosen for robustness over cleverness):
    - trainable dense weights (full FT, ZeRO-2): the masked slices (gate/up rows and biases, down columns;
      GPT-2 c_fc columns and biases, c_proj rows; at site mlp_output the down rows and bias) are
      snapshotted once and written back by `restore()`. Masked weights get exactly zero gradient, so only
      the optimizer's decay moves them; writing the snapshot back undoes that for any optimizer, weight
      decay, grad clipping or ZeRO-2 (params are full on each rank), with no per-parameter-group surgery
      (torch optimizers cannot exempt slices of a tensor from decay). Masked weights never influence the
      masked forward or backward, so restoring before anything reads them unmasked (a save, an unmasked
      eval) is enough; restoring after every step also works and keeps the invariant at all times, at
      the cost of one index_copy_ of the slices (most of the MLP weights in preserve mode).
      Update masks (`masking.update`) leave masked weights in the forward pass, so there `restore()` must
      run after every optimizer step (the training loop does), with gradient hooks zeroing their gradients.
    - LoRA: base weights are frozen; the adapter could still move masked slices after merging. The guard
      zeroes the down projection's lora_A columns of masked inputs (and at site mlp_output lora_B rows of
      masked outputs) and the gate/up lora_B rows of masked neurons, and `restore()` re-zeroes them. With
      zero value and zero gradient, AdamW keeps them at zero (decay of 0 is 0), so B@A is exactly zero on
      masked slices and the merged weights equal the base there.
    Refused (UsageError): DoRA and other LoRA variants, non-LoRA PEFT adapters, LoRA inits that rewrite the
    base weights (PiSSA, OLoRA, LoftQ, CorDA, ...), and ZeRO-3-partitioned parameters.
    """

    def __init__(self, slices: list[_Slice]):
        self._slices = slices
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Write the snapshots back and re-zero the LoRA slices. Call before every save and before using the
        model unmasked; calling it after every optimizer step is also fine."""
        for s in self._slices:
            index = s.on_device()
            if s.saved is None:
                s.param.index_fill_(s.dim, index, 0.0)
            else:
                s.param.index_copy_(s.dim, index, s.saved.to(s.param.device, non_blocking=True))

    @torch.no_grad()
    def verify(self) -> list[str]:
        """Names of the protected tensors whose masked slices differ from the snapshot (or from zero)."""
        bad = []
        for s in self._slices:
            current = s.param.index_select(s.dim, s.on_device())
            expected = torch.zeros_like(current) if s.saved is None else s.saved.to(current.device)
            if not torch.equal(current, expected):
                bad.append(s.name)
        return bad

    def num_protected(self) -> int:
        """Number of weight entries held fixed (snapshotted or zeroed)."""
        return sum(s.index.numel() * s.param.numel() // s.param.shape[s.dim] for s in self._slices)


def protect_masked_weights(
    model: nn.Module,
    masks: Mapping[int, torch.Tensor],
    site: str = "intermediate",
    offload: bool = False,
) -> MaskedWeightGuard:
    """Make the guard that keeps masked neurons' weights untouched (see MaskedWeightGuard for why/how).

    Call after PEFT wrapping and after choosing what is trainable (only trainable tensors are
    snapshotted), before training (and, when resuming, before loading a checkpoint so the snapshot
    holds the base weights). `offload=True` keeps snapshots on the CPU: no extra GPU memory (preserve
    mode snapshots most MLP weights), a slower restore (a host-to-device copy).
    """
    return MaskedWeightGuard(masked_slices(model, masks, site, offload=offload))


def masked_slices(
    model: nn.Module,
    masks: Mapping[int, torch.Tensor],
    site: str = "intermediate",
    offload: bool = False,
    snapshot: bool = True,
) -> list[_Slice]:
    """The trainable tensor slices that carry masked neurons' weights (see MaskedWeightGuard for which).
    `snapshot=False` records where they are without copying them (ZeRO-3 partitions: gradient hooks only)."""
    _check_lora_inits(model)
    names = {id(m): n for n, m in model.named_modules()}
    slices: list[_Slice] = []
    for module, side, masked in masked_features(model, masks, site):
        slices += _protect(module, names, masked, side=side, offload=offload, snapshot=snapshot)
    return slices


def masked_features(
    model: nn.Module, masks: Mapping[int, torch.Tensor], site: str = "intermediate"
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, side, index) for each MLP linear holding masked neurons' weights: the masked input features
    (side "in": down projection at site intermediate) or output features ("out": gate/up, fused gate_up halves,
    GPT-2 c_fc; the down projection at site mlp_output)."""
    if site not in SITES:
        raise UsageError(f"unknown mask site {site!r}; use one of {', '.join(SITES)}")
    layers = find_mlp_layers(model)
    checked = check_masks(masks, layers, site)
    found: list[tuple[nn.Module, str, torch.Tensor]] = []
    for index, mask in sorted(checked.items()):
        layer = layers[index]
        masked = torch.nonzero(mask == 0).flatten()
        if masked.numel() == 0:
            continue
        if site == "mlp_output":
            found.append((layer.down, "out", masked))
            continue
        found.append((layer.down, "in", masked))
        if not layer.ups:
            raise UsageError(
                f"could not find the layers producing the MLP neurons of {type(layer.mlp).__name__} (layer "
                f"{index}), so their weights cannot be protected; use templates built at site mlp_output "
                "(templates build --site mlp_output, or --ica-site mlp_output)"
            )
        for module, fused in layer.ups:
            found.append((module, "out", torch.cat([masked, masked + layer.width]) if fused else masked))
    return found


def _check_lora_inits(model: nn.Module) -> None:
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        init = getattr(cfg, "init_lora_weights", True)
        if not (isinstance(init, bool) or str(init).lower() in _LORA_INITS):
            raise UsageError(
                f"LoRA adapter {name!r} uses init_lora_weights={init!r}, which rewrites the base weights, so "
                "masked neurons would not stay untouched; use init_lora_weights=True"
            )


def _protect(
    module: nn.Module, names: dict, index: torch.Tensor, side: str, offload: bool, snapshot: bool = True
) -> list[_Slice]:
    """Slices of `module` touching `index`: its input features (side "in") or output features ("out")."""
    base = unwrap(module)
    layout = linear_features(module)[2]
    wdim = weight_dim(layout, side)
    label = names.get(id(module), type(module).__name__)
    slices = []
    tensors = [("weight", base.weight, wdim)]
    if side == "out" and getattr(base, "bias", None) is not None:
        tensors.append(("bias", base.bias, 0))
    for tname, tensor, dim in tensors:
        if not tensor.requires_grad:
            continue
        idx, saved = index.to(tensor.device), None
        if snapshot:
            _refuse_partitioned(tensor, label)
            saved = tensor.detach().index_select(dim, idx)
            saved = saved.cpu() if offload else saved
        slices.append(_Slice(f"{label}.{tname}", tensor, dim, idx, saved, offload))
    if base is not module:
        slices += _lora_slices(module, label, index, side)
    return slices


def weight_dim(layout: str, side: str) -> int:
    """The weight dimension holding input (side "in") or output ("out") features: Linear is [out, in], Conv1D [in,
    out]."""
    return {("linear", "in"): 1, ("linear", "out"): 0, ("conv1d", "in"): 0, ("conv1d", "out"): 1}[(layout, side)]


def _lora_slices(module: nn.Module, label: str, index: torch.Tensor, side: str) -> list[_Slice]:
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        raise UsageError(
            f"{label} is wrapped by a {type(module).__name__} adapter; the untouched guarantee supports plain "
            "LoRA only (use a LoraConfig)"
        )
    variants = [a for a, v in getattr(module, "lora_variant", {}).items() if v is not None]
    if variants or any(getattr(module, "use_dora", {}).values()) or hasattr(module, "lora_E"):
        raise UsageError(
            f"{label} uses a LoRA variant (DoRA, AdaLoRA, ...) that rescales whole rows, so masked neurons' "
            "weights would change after merging; use plain LoRA (use_dora=False)"
        )
    slices = []
    for adapter in lora_a:
        if side == "in":  # delta = B @ A: zero A's columns of masked inputs
            tensors = [("lora_A", lora_a[adapter].weight, 1)]
        else:  # zero B's rows (and bias) of masked outputs
            tensors = [("lora_B", lora_b[adapter].weight, 0)]
            if getattr(lora_b[adapter], "bias", None) is not None:
                tensors.append(("lora_B.bias", lora_b[adapter].bias, 0))
        for tname, tensor, dim in tensors:
            _refuse_partitioned(tensor, label)
            slices.append(_Slice(f"{label}.{tname}.{adapter}", tensor, dim, index.to(tensor.device), None))
    return slices


def _refuse_partitioned(tensor: torch.Tensor, label: str) -> None:
    if hasattr(tensor, "ds_id"):
        raise UsageError(
            f"{label} is partitioned by DeepSpeed ZeRO-3, so its masked slices cannot be held fixed; "
            "use ZeRO-2 or a single device for masked fine-tuning"
        )
