"""Finding the MLPs of a Hugging Face causal LM: one `MLPLayer` per decoder layer.

Used by activation capture (templates build), mask building/application and the benchmarks alike, so it
imports neither the masking machinery nor the Triton kernels. Found generically (no per-architecture
table): the down projection is the one linear-like layer of a decoder block, outside attention, that maps
more features than the hidden size to the hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fnscale.config import SITES  # noqa: F401  (re-exported: the capture sites)
from fnscale.errors import UsageError

# Dotted-path parts that mark attention modules; their output projection can look like a down
# projection (e.g. Gemma-7B's o_proj maps 4096 -> 3072 == hidden).
_ATTENTION_PARTS = ("attn", "attention")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


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


def linear_features(module: nn.Module) -> tuple[int, int, str] | None:
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
        feats = linear_features(module)
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
