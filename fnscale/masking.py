"""Apply functional-network masks to a Hugging Face causal LM, and keep masked weights untouched.

A mask is a float vector per decoder layer, 1 = keep. At site "intermediate" (default) it spans the
MLP's intermediate neurons and multiplies the input of the down projection (`masked = x * mask`), so
masked neurons neither contribute nor receive gradient. At site "mlp_output" it spans the hidden-size
channels of the MLP output (Liu et al. 2025). Three interchangeable paths compute the intermediate mask:
"hook" (a forward pre-hook on the down projection, any device), "triton" (fused act*up*mask kernel, CUDA)
and "compact" (the MLP computed over kept neurons only; preserve mode with few kept neurons).

Zero gradient does not keep masked weights untouched: AdamW's weight decay still shrinks them, and
LoRA's down-projection A has columns for masked inputs that would leak once merged. See
`protect_masked_weights` for the mechanism.

Order in a training script:

    model = get_peft_model(model, lora_config)            # first: hooks must sit on the LoRA wrappers
    layers = find_mlp_layers(model)
    masks = build_masks(neurons_by_layer, "lesion", len(layers), layers[0].width)
    handle = apply_masks(model, masks)
    guard = protect_masked_weights(model, masks)          # before training (and before loading a checkpoint)
    for step, batch in enumerate(loader):
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if checkpoint_due(step):
            guard.restore(); save_checkpoint()            # masks stay on; training continues
    guard.restore(); handle.remove(); model.save_pretrained(out)   # saved model runs unmasked

While the masks are on, masked weights influence neither the forward nor the gradients, so restoring
them before each save (or unmasked evaluation) is enough; calling guard.restore() after every
optimizer step is also correct, and cheap in lesion mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fnscale.errors import UsageError
from fnscale.kernels import interpret_mode, set_forward, triton_importable

SITES = ("intermediate", "mlp_output")
MODES = ("lesion", "preserve")
KERNELS = ("auto", "torch", "triton")

# Dotted-path parts that mark attention modules; their output projection can look like a down
# projection (e.g. Gemma-7B's o_proj maps 4096 -> 3072 == hidden).
_ATTENTION_PARTS = ("attn", "attention")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# --------------------------------------------------------------------------------------------------
# Finding the MLPs


@dataclass(eq=False)
class MLPLayer:
    """One decoder layer's MLP.

    `down` is the module the MLP calls (a PEFT wrapper when LoRA is on: the mask must reach both the
    base and the LoRA path); `ups` are the producers of the intermediate neurons (gate/up, c_fc, or a
    fused gate_up of 2*width outputs, halves [gate; up]). `kind` is "gated" (Llama-style gate_proj/
    up_proj/down_proj/act_fn), "gpt2" (c_fc/act/c_proj/dropout) or "generic" (hook path only); `act`
    is "silu"/"gelu_tanh" when the fused kernel supports the activation, else None.
    """

    mlp: nn.Module
    down: nn.Module
    kind: str
    act: str | None
    index: int
    width: int
    hidden: int
    ups: list[tuple[nn.Module, bool]] = field(default_factory=list)  # (module, fused gate_up)
    mlp_is_block: bool = False


def unwrap(module: nn.Module) -> nn.Module:
    """The layer under PEFT wrappers (`base_layer`); bitsandbytes Linear4bit/Linear8bitLt are nn.Linear."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _features(module: nn.Module) -> tuple[int, int, str] | None:
    """(in_features, out_features, layout) of a linear-like layer, layout "linear" (weight [out, in]) or
    "conv1d" (transformers Conv1D, weight [in, out]); None for anything else."""
    base = unwrap(module)
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf") and hasattr(base, "nx"):
        return int(base.nx), int(base.nf), "conv1d"
    fin, fout = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int) and hasattr(base, "weight"):
        return fin, fout, "linear"
    return None


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UsageError(f"{type(model).__name__} has no .config; pass a Hugging Face causal LM")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _arch_name(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    if archs:
        return archs[0]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__


def _linear_layers(block: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, in, out) of the linear-like layers in a block; a wrapper stands for what it wraps."""
    found, wrapped = [], []
    for name, module in block.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        feats = _features(module)
        if feats is None:
            continue
        wrapped.append(name)
        found.append((name, module, feats[0], feats[1]))
    return found


def _in_attention(name: str) -> bool:
    return any(part in piece.lower() for piece in name.split(".") for part in _ATTENTION_PARTS)


def _down_candidates(block: nn.Module, hidden: int) -> list[tuple[str, nn.Module, int, int]]:
    return [x for x in _linear_layers(block) if x[2] > x[3] == hidden and not _in_attention(x[0])]


def _decoder_blocks(model: nn.Module, num_layers: int | None, hidden: int) -> nn.ModuleList | None:
    """The ModuleList of decoder blocks: same-type blocks, length num_layers preferred, holding a down projection."""
    lists = [
        m
        for _, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
    ]
    lists.sort(key=lambda m: (len(m) != num_layers, -len(m)))  # stable: shallowest first among equals
    for blocks in lists:
        if _down_candidates(blocks[0], hidden):
            return blocks
    return None


_SILU = ("SiLU", "SiLUActivation")
_GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")


def _act_name(act: object) -> str | None:
    """The fused kernel's name for an activation module, or None when the kernel does not support it."""
    name = type(act).__name__
    if name in _SILU:
        return "silu"
    if name in _GELU_TANH or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    return None


def _has_modules(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def find_mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """One `MLPLayer` per decoder layer, found generically: the down projection is the linear-like layer
    (nn.Linear, transformers Conv1D, bitsandbytes, under PEFT wrappers) in a block, outside attention,
    whose in-features > out-features == hidden size. Raises UsageError where there is none (or several)."""
    cfg = _text_config(model)
    arch = _arch_name(model)
    if any(int(getattr(cfg, key, 0) or 0) > 1 for key in _MOE_KEYS):
        raise UsageError(f"{arch} is a mixture-of-experts model; fnscale masks dense MLPs only")
    hidden = getattr(cfg, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    num_layers = getattr(cfg, "num_hidden_layers", None)
    blocks = _decoder_blocks(model, num_layers, hidden)
    if blocks is None:
        raise UsageError(
            f"could not find the MLP down projection in {arch}; fnscale looks for a Linear/Conv1D in each "
            f"decoder block mapping more than {hidden} features to the hidden size {hidden} (dense MLPs only)"
        )
    layers = []
    for index, block in enumerate(blocks):
        downs = _down_candidates(block, hidden)
        if len(downs) != 1:
            names = ", ".join(x[0] for x in downs) or "none"
            raise UsageError(
                f"could not find the MLP down projection in {arch} layer {index}: expected one Linear/Conv1D "
                f"mapping more than {hidden} features to {hidden} outside attention, found {names}"
            )
        down_name, down, width, _ = downs[0]
        mlp_name = down_name.rpartition(".")[0]
        mlp = block.get_submodule(mlp_name) if mlp_name else block
        prefix = mlp_name + "." if mlp_name else ""
        ups = [
            (m, out == 2 * width)
            for name, m, fin, out in _linear_layers(block)
            if name.startswith(prefix) and fin == hidden and out in (width, 2 * width) and not _in_attention(name)
        ]
        kind, act = "generic", None
        if _has_modules(mlp, "gate_proj", "up_proj", "act_fn") and getattr(mlp, "down_proj", None) is down:
            kind, act = "gated", _act_name(mlp.act_fn)
        elif _has_modules(mlp, "c_fc", "act", "dropout") and getattr(mlp, "c_proj", None) is down:
            kind, act = "gpt2", _act_name(mlp.act)
        layers.append(MLPLayer(mlp, down, kind, act, index, width, hidden, ups, mlp is block))
    return layers


# --------------------------------------------------------------------------------------------------
# Building masks


def _neuron_ids(neurons, layer: int, width: int) -> torch.Tensor:
    arr = np.asarray(sorted(neurons) if isinstance(neurons, (set, frozenset)) else neurons).reshape(-1)
    if arr.size == 0:
        return torch.empty(0, dtype=torch.long)
    if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise UsageError(f"layer {layer}: neuron ids must be integers, got {arr.dtype} values")
    if arr.min() < 0 or arr.max() >= width:
        bad = int(arr.min() if arr.min() < 0 else arr.max())
        raise UsageError(
            f"layer {layer}: neuron {bad} is outside 0..{width - 1}; the template was built for another model"
        )
    return torch.as_tensor(arr.astype(np.int64))


def build_masks(
    neurons_by_layer: Mapping[int, Iterable[int]],
    mode: str,
    num_layers: int,
    width: int,
    layers: Iterable[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Float masks (1 = keep) per layer from the selected neurons of each layer.

    lesion: 0 on the selected neurons, 1 elsewhere. preserve: 1 on the selected neurons, 0 elsewhere;
    a layer without any selected neuron is left unmasked (as the reference implementation does: zeroing
    a whole MLP would make preserve a layer-ablation). Only layers in `layers` (default all) are masked.
    Layers whose mask keeps everything are omitted, so the result holds only masks that do something.
    Refuses (UsageError) a mask that changes nothing or removes every neuron of every layer.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mask mode {mode!r}; use one of {', '.join(MODES)}")
    chosen = set(range(num_layers)) if layers is None else {int(x) for x in layers}
    outside = sorted(x for x in chosen if not 0 <= x < num_layers)
    if outside:
        raise UsageError(f"layer {outside[0]} does not exist; the model has layers 0..{num_layers - 1}")
    masks = {}
    for key, neurons in neurons_by_layer.items():
        layer = int(key)
        if not 0 <= layer < num_layers:
            raise UsageError(
                f"the neurons name layer {layer} but the model has layers 0..{num_layers - 1}; "
                "the template was built for another model"
            )
        ids = _neuron_ids(neurons, layer, width)
        if layer not in chosen or ids.numel() == 0:
            continue
        if mode == "lesion":
            mask = torch.ones(width).index_fill_(0, ids, 0.0)
        else:
            mask = torch.zeros(width).index_fill_(0, ids, 1.0)
        if not bool((mask == 1).all()):
            masks[layer] = mask
    if not masks:
        raise UsageError(
            f"the {mode} mask changes nothing (no selected neuron is removed in the chosen layers); "
            "choose other components or layers"
        )
    if len(masks) == num_layers and all(not bool(m.any()) for m in masks.values()):
        raise UsageError("the lesion mask removes every MLP neuron of every layer; select fewer components")
    return masks


# --------------------------------------------------------------------------------------------------
# Applying masks


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

    def __enter__(self) -> "MaskHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_masks(masks: Mapping[int, torch.Tensor], layers: list[MLPLayer], site: str) -> dict[int, torch.Tensor]:
    checked = {}
    for key, mask in masks.items():
        layer = int(key)
        if not 0 <= layer < len(layers):
            raise UsageError(f"a mask names layer {layer} but the model has layers 0..{len(layers) - 1}")
        mask = torch.as_tensor(mask).detach().to("cpu", torch.float32).reshape(-1)
        size = layers[layer].width if site == "intermediate" else layers[layer].hidden
        if mask.numel() != size:
            what = "MLP neurons" if site == "intermediate" else "hidden channels"
            raise UsageError(
                f"the mask for layer {layer} has {mask.numel()} entries but the model has {size} {what} there; "
                "the masks were built for another model or capture site"
            )
        checked[layer] = mask
    return checked


def _use_triton(kernel: str, site: str, layers: list[MLPLayer]) -> bool:
    """Resolve kernel "auto"/"torch"/"triton" to whether the fused kernel is used (errors for impossible asks)."""
    if kernel not in KERNELS:
        raise UsageError(f"unknown mask kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return False
    if site == "mlp_output":
        if kernel == "triton":
            raise UsageError(
                "the Triton mask kernel fuses the intermediate-neuron mask; with --mask-site mlp_output "
                "use --mask-kernel torch"
            )
        return False
    param = next(layers[0].down.parameters(), None)
    on_cuda = param is not None and param.device.type == "cuda"
    if kernel == "auto":
        return on_cuda and triton_importable()
    if not (on_cuda or interpret_mode()):
        raise UsageError("the Triton mask kernel needs CUDA; use --mask-kernel torch")
    if not triton_importable():
        raise UsageError("the Triton mask kernel needs the triton package (pip install triton); use --mask-kernel torch")
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
    checked = _check_masks(masks, layers, site)
    triton_on = _use_triton(kernel, site, layers)
    handle = MaskHandle(site, checked)
    try:
        for index, mask in sorted(checked.items()):
            handle.paths[index] = _apply_one(layers[index], mask, site, kernel, triton_on, compact, handle._undo)
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply_one(layer, mask, site, kernel, triton_on, compact, undo) -> str:
    copies = _MaskCopies(mask)
    if site == "mlp_output":
        if layer.mlp_is_block:
            raise UsageError(
                f"layer {layer.index} has no MLP submodule (its MLP layers sit in the decoder block), so its "
                "MLP output cannot be hooked; use --mask-site intermediate"
            )
        undo.append(layer.mlp.register_forward_hook(_output_hook(copies)).remove)
        return "mlp_output"
    kept_share = float((mask != 0).float().mean())
    if compact is not False and _compact_eligible(layer) and (compact or kept_share < 0.5):
        undo.append(_patch_compact(layer.mlp, mask))
        return "compact"
    if triton_on:
        reason = None
        if layer.kind not in ("gated", "gpt2") or layer.act is None:
            what = f"{layer.kind} MLP" if layer.kind == "generic" else "unsupported activation"
            reason = (
                f"it supports Llama-style and GPT-2 MLPs with silu or gelu_tanh, and layer {layer.index} is a "
                f"{type(layer.mlp).__name__} ({what})"
            )
        elif "forward" in vars(layer.mlp):
            reason = f"the forward of layer {layer.index}'s MLP is already replaced (masks applied twice?)"
        if reason is None:
            from fnscale import kernels

            patch = kernels.patch_gated_mlp if layer.kind == "gated" else kernels.patch_gpt2_mlp
            param = next(layer.down.parameters())
            undo.append(patch(layer.mlp, mask.to(param.device), layer.act))
            return "triton"
        if kernel == "triton":
            raise UsageError(f"the Triton mask kernel cannot be used: {reason}; use --mask-kernel torch")
    undo.append(layer.down.register_forward_pre_hook(_input_hook(copies)).remove)
    return "hook"


# --------------------------------------------------------------------------------------------------
# The untouched guarantee


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
    if site not in SITES:
        raise UsageError(f"unknown mask site {site!r}; use one of {', '.join(SITES)}")
    _check_lora_inits(model)
    layers = find_mlp_layers(model)
    checked = _check_masks(masks, layers, site)
    names = {id(m): n for n, m in model.named_modules()}
    slices: list[_Slice] = []
    for index, mask in sorted(checked.items()):
        layer = layers[index]
        masked = torch.nonzero(mask == 0).flatten()
        if masked.numel() == 0:
            continue
        if site == "mlp_output":
            slices += _protect(layer.down, names, masked, side="out", offload=offload)
            continue
        slices += _protect(layer.down, names, masked, side="in", offload=offload)
        if not layer.ups:
            raise UsageError(
                f"could not find the layers producing the MLP neurons of {type(layer.mlp).__name__} (layer "
                f"{index}), so their weights cannot be protected; use --mask-site mlp_output"
            )
        for module, fused in layer.ups:
            rows = torch.cat([masked, masked + layer.width]) if fused else masked
            slices += _protect(module, names, rows, side="out", offload=offload)
    return MaskedWeightGuard(slices)


def _check_lora_inits(model: nn.Module) -> None:
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        init = getattr(cfg, "init_lora_weights", True)
        if not (isinstance(init, bool) or str(init).lower() in _LORA_INITS):
            raise UsageError(
                f"LoRA adapter {name!r} uses init_lora_weights={init!r}, which rewrites the base weights, so "
                "masked neurons would not stay untouched; use init_lora_weights=True"
            )


def _protect(module: nn.Module, names: dict, index: torch.Tensor, side: str, offload: bool) -> list[_Slice]:
    """Slices of `module` touching `index`: its input features (side "in") or output features ("out")."""
    base = unwrap(module)
    layout = _features(module)[2]
    # Linear weight is [out, in], Conv1D weight is [in, out].
    wdim = {("linear", "in"): 1, ("linear", "out"): 0, ("conv1d", "in"): 0, ("conv1d", "out"): 1}[(layout, side)]
    label = names.get(id(module), type(module).__name__)
    slices = []
    tensors = [("weight", base.weight, wdim)]
    if side == "out" and getattr(base, "bias", None) is not None:
        tensors.append(("bias", base.bias, 0))
    for tname, tensor, dim in tensors:
        if tensor.requires_grad:
            _refuse_partitioned(tensor, label)
            idx = index.to(tensor.device)
            saved = tensor.detach().index_select(dim, idx)
            slices.append(_Slice(f"{label}.{tname}", tensor, dim, idx, saved.cpu() if offload else saved, offload))
    if base is not module:
        slices += _lora_slices(module, label, index, side)
    return slices


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
