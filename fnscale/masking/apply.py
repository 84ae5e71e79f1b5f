"""Applying masks to a model in place: hooks, the compact MLP, and dispatch to the fused Triton kernel.

At site "intermediate" a mask multiplies the input of the down projection (`masked = x * mask`), so
masked neurons neither contribute nor receive gradient. Three interchangeable paths compute it: "hook"
(a forward pre-hook on the down projection, any device), "triton" (fused act*up*mask kernel, CUDA) and
"compact" (the MLP computed over kept neurons only; preserve mode with few kept neurons). At site
"mlp_output" a forward hook multiplies the hidden-size channels of the MLP output (Liu et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fnscale import kernels
from fnscale.errors import UsageError
from fnscale.kernels import interpret_mode, set_forward, triton_importable
from fnscale.masking.build import check_masks
from fnscale.models.mlp import SITES, MLPLayer, find_mlp_layers

KERNELS = ("auto", "torch", "triton")


class _MaskCopies:
    """A mask with one copy per (device, dtype), made on first use, so `x * mask` keeps x's dtype and
    device with no per-step transfer (and survives a model moved after apply_masks)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        copy = self._copies.get((device, dtype))
        if copy is None:
            copy = self._copies[(device, dtype)] = self.mask.to(device=device, dtype=dtype)
        return copy

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.get(x.device, x.dtype)


def _input_hook(copies: _MaskCopies):
    def hook(module, args):
        x = args[0]
        return (x * copies.like(x), *args[1:])

    return hook


def _output_hook(copies: _MaskCopies):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * copies.like(output[0]), *output[1:])
        return output * copies.like(output)

    return hook


def _is_partitioned(module: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 partitions parameters (they carry `ds_id` and are gathered by module hooks)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _compact_eligible(layer: MLPLayer) -> bool:
    """Plain nn.Linear gate/up/down (no LoRA, no quantization, no ZeRO-3 partitions, no hooks: the compact
    forward reads their weights directly, so it would bypass a wrapper's or hook's work)."""
    if layer.kind != "gated":
        return False
    mlp = layer.mlp
    projections = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return (
        all(type(p) is nn.Linear and not p._forward_hooks and not p._forward_pre_hooks for p in projections)
        and "forward" not in vars(mlp)
        and not _is_partitioned(mlp)
    )


def _patch_compact(mlp: nn.Module, mask: torch.Tensor) -> Callable[[], None]:
    """Compute a gated MLP over its kept neurons only: index_select of gate/up rows and down columns each
    forward (autograd routes gradients into those slices of the full weights; the others get exact zeros).
    Equal to masking up to summation order; FLOPs scale with the kept share."""
    keep = torch.nonzero(mask).flatten()
    scale = mask[keep]
    keep_on = _MaskCopies(keep)
    scale_on = None if bool((scale == 1).all()) else _MaskCopies(scale)

    def rows(linear: nn.Linear, idx: torch.Tensor):
        bias = None if linear.bias is None else linear.bias.index_select(0, idx)
        return linear.weight.index_select(0, idx), bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        idx = keep_on.get(mlp.gate_proj.weight.device, torch.long)
        h = mlp.act_fn(F.linear(x, *rows(mlp.gate_proj, idx))) * F.linear(x, *rows(mlp.up_proj, idx))
        if scale_on is not None:
            h = h * scale_on.like(h)
        return F.linear(h, mlp.down_proj.weight.index_select(1, idx), mlp.down_proj.bias)

    return set_forward(mlp, forward)


class MaskHandle:
    """Masks applied by `apply_masks`. `remove()` restores the model exactly (idempotent); `stats()` gives
    the number of masked neurons (mask == 0) per layer; `paths[layer]` says how each layer is masked:
    "hook", "triton", "compact" or "mlp_output"."""

    def __init__(self, site: str, masks: dict[int, torch.Tensor]):
        self.site = site
        self.masks = masks
        self.paths: dict[int, str] = {}
        self._undo: list[Callable[[], None]] = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def stats(self) -> dict[int, int]:
        return {layer: int((m == 0).sum()) for layer, m in sorted(self.masks.items())}

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _use_triton(kernel: str, site: str, layers: list[MLPLayer]) -> bool:
    """Resolve kernel "auto"/"torch"/"triton" to whether the fused kernel is used (errors for impossible asks)."""
    if kernel not in KERNELS:
        raise UsageError(f"unknown mask kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return False
    if site == "mlp_output":
        if kernel == "triton":
            raise UsageError(
                "the Triton mask kernel fuses the intermediate-neuron mask, and these masks are at site mlp_output "
                "(the site comes from the templates); use --mask-kernel torch"
            )
        return False
    param = next(layers[0].down.parameters(), None)
    on_cuda = param is not None and param.device.type == "cuda"
    if kernel == "auto":
        return on_cuda and triton_importable()
    if not (on_cuda or interpret_mode()):
        raise UsageError("the Triton mask kernel needs CUDA; use --mask-kernel torch")
    if not triton_importable():
        raise UsageError(
            "the Triton mask kernel needs the triton package (pip install triton); use --mask-kernel torch"
        )
    return True


def apply_masks(
    model: nn.Module,
    masks: Mapping[int, torch.Tensor],
    site: str = "intermediate",
    kernel: str = "auto",
    compact: bool | None = None,
) -> MaskHandle:
    """Mask the model's MLPs in place; returns a MaskHandle whose `remove()` undoes it exactly.

    site "intermediate": `masked = x * mask` on the input of each down projection. kernel "torch" does it
    with a forward pre-hook (one elementwise multiply, dtype kept, any device); "triton" patches gated
    (Llama-style) and GPT-2 MLP forwards to the fused act*up*mask kernel (CUDA only; UsageError where a
    layer cannot use it); "auto" takes triton for supported layers when the model is on CUDA and triton
    imports, else torch. site "mlp_output": a forward hook multiplies the MLP output's hidden channels.

    compact: compute the MLP over kept neurons only (same result, fewer FLOPs) for plain (non-LoRA,
    non-quantized, not ZeRO-3, unhooked) Llama-style MLPs; None = on for layers keeping under half their
    neurons (preserve mode in practice), True = on wherever eligible, False = never. Other layers are
    masked. A compact MLP reads gate/up/down weights directly, so hooks added to those modules later
    do not fire.

    Call after PEFT wrapping: the hook must sit on the LoRA wrapper so the LoRA path sees masked input.
    """
    if site not in SITES:
        raise UsageError(f"unknown mask site {site!r}; use one of {', '.join(SITES)}")
    layers = find_mlp_layers(model)
    checked = check_masks(masks, layers, site)
    triton_on = _use_triton(kernel, site, layers)
    handle = MaskHandle(site, checked)
    try:
        for index, mask in sorted(checked.items()):
            handle.paths[index] = _apply_one(layers[index], mask, site, kernel, triton_on, compact, handle._undo)
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply_one(layer: MLPLayer, mask, site, kernel, triton_on, compact, undo) -> str:
    """Mask one layer by the first path that fits (mlp_output hook, compact, triton, hook); returns the path."""
    copies = _MaskCopies(mask)
    if site == "mlp_output":
        if layer.mlp_is_block:
            raise UsageError(
                f"layer {layer.index} has no MLP submodule (its MLP layers sit in the decoder block), so its "
                "MLP output cannot be hooked; use templates built at site intermediate (templates build --site "
                "intermediate, "
                "or --ica-site intermediate)"
            )
        undo.append(layer.mlp.register_forward_hook(_output_hook(copies)).remove)
        return "mlp_output"
    kept_share = float((mask != 0).float().mean())
    if compact is not False and _compact_eligible(layer) and (compact or kept_share < 0.5):
        undo.append(_patch_compact(layer.mlp, mask))
        return "compact"
    if triton_on:
        reason = _triton_refusal(layer)
        if reason is None:
            patch = kernels.patch_gated_mlp if layer.kind == "gated" else kernels.patch_gpt2_mlp
            param = next(layer.down.parameters())
            undo.append(patch(layer.mlp, mask.to(param.device), layer.act))
            return "triton"
        if kernel == "triton":
            raise UsageError(f"the Triton mask kernel cannot be used: {reason}; use --mask-kernel torch")
    undo.append(layer.down.register_forward_pre_hook(_input_hook(copies)).remove)
    return "hook"


def _triton_refusal(layer: MLPLayer) -> str | None:
    """Why the fused kernel cannot mask this layer, or None when it can."""
    if layer.kind not in ("gated", "gpt2") or layer.act is None:
        what = f"{layer.kind} MLP" if layer.kind == "generic" else "unsupported activation"
        return (
            f"it supports Llama-style and GPT-2 MLPs with silu or gelu_tanh, and layer {layer.index} is a "
            f"{type(layer.mlp).__name__} ({what})"
        )
    if "forward" in vars(layer.mlp):
        return f"the forward of layer {layer.index}'s MLP is already replaced (masks applied twice?)"
    return None
