"""Optimizer state only for the trained slices (`--optimizer-slices`), for update masks under full fine-tuning.

With dense gradients, AdamW keeps two moments for every MLP weight of a masked layer, also for the masked slices
that never move: in preserve-update with 10% kept, 90% of that state is zeros. Here each MLP linear of a masked
layer is reparametrised instead: its dense weight is frozen (no gradient, no optimizer state, nothing for the
guard to snapshot), and a trainable delta holds only the trained slice, in the weight's own layout:
- output slices (gate/up rows, fused gate_up halves, GPT-2 c_fc columns): y[..., idx] += x @ delta.T
- input slices (down columns, GPT-2 c_proj rows): y += x[..., idx] @ delta.T
applied by a forward hook, so no full weight copy is made and parameter names stay those of the HF model. The
deltas are ordinary parameters: DDP reduces them, checkpoints save them, resume loads them. `fold()` adds them
into the weights (W[idx] += delta) and removes them, so the saved model is a plain HF model; masked slices are
never written (the guarantee holds by construction). Biases stay dense (tiny) under the gradient hooks and guard.

Weight decay matches dense training: AdamW's decoupled decay shrinks the effective weight W[idx] + delta, so the
deltas sit in the no-decay group and an optimizer step pre-hook applies delta -= lr * wd * (W[idx] + delta), which
is what AdamW does to W[idx] before its Adam update. Compute: the forward adds a kept-size matmul, the backward
computes kept-size weight gradients instead of full ones: cheaper below about 1/3 kept, close to even at 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fnscale.masking.guard import masked_features, weight_dim
from fnscale.models.mlp import linear_features, unwrap

DELTA = "fnscale_delta"  # the delta's parameter name on its module (in checkpoints, never in the saved model)


@dataclass(eq=False)
class _Delta:
    module: nn.Module
    delta: nn.Parameter
    dim: int  # the weight dimension the trained slice runs along
    index: torch.Tensor  # trained features along `dim`
    side: str  # "out": a slice of output features; "in": of input features
    conv1d: bool  # transformers Conv1D (weight [in, out])
    handle: object = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def on_device(self) -> torch.Tensor:
        """The index on the weight's device, moved once (the deltas are made before `accelerator.prepare` moves the
        model)."""
        if self.index.device != self.delta.device:
            self.index = self.index.to(self.delta.device)
        return self.index

    def forward_hook(self, module, args, out):
        x = args[0]
        lin = self.delta.t() if self.conv1d else self.delta  # as a Linear weight: [kept, in] or [out, kept]
        index = self.on_device()
        if self.side == "out":
            return out.index_add(-1, index, x @ lin.t().to(x.dtype))
        return out + x.index_select(-1, index) @ lin.t().to(x.dtype)


class SliceDeltas:
    """The frozen dense MLP weights of the masked layers and the trainable deltas of their trained slices."""

    def __init__(self, model: nn.Module, masks, site: str, weight_decay: float):
        self.weight_decay = weight_decay
        self._deltas: list[_Delta] = []
        for module, side, masked in masked_features(model, masks, site):
            base = unwrap(module)
            if not base.weight.requires_grad:
                continue
            fin, fout, layout = linear_features(base)
            keep = torch.ones(fin if side == "in" else fout, dtype=torch.bool)
            keep[masked] = False
            dim, index = weight_dim(layout, side), torch.nonzero(keep).flatten().to(base.weight.device)
            delta = nn.Parameter(torch.zeros_like(base.weight.detach().index_select(dim, index)))
            base.weight.requires_grad_(False)
            base.register_parameter(DELTA, delta)
            d = _Delta(base, delta, dim, index, side, layout == "conv1d")
            d.handle = base.register_forward_hook(d.forward_hook)
            self._deltas.append(d)
        self._by_id = {id(d.delta): d for d in self._deltas}

    def parameters(self) -> list[nn.Parameter]:
        return [d.delta for d in self._deltas]

    def numel(self) -> tuple[int, int]:
        """(trained elements held by the deltas, elements of the dense weights they stand in for)."""
        return sum(d.delta.numel() for d in self._deltas), sum(d.weight.numel() for d in self._deltas)

    def bind(self, optimizer: torch.optim.Optimizer):
        """Decay the effective weights as dense AdamW would (see the module docstring); call on the torch optimizer
        before `accelerator.prepare` (its hooks run whenever a step really happens)."""
        return optimizer.register_step_pre_hook(self._decay)

    @torch.no_grad()
    def _decay(self, optimizer, args, kwargs) -> None:
        if not self.weight_decay:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                d = self._by_id.get(id(p))
                if d is not None and p.grad is not None:
                    p.sub_(group["lr"] * self.weight_decay * (d.weight.index_select(d.dim, d.on_device()) + p))

    @torch.no_grad()
    def fold(self) -> None:
        """Add each delta into its weight's trained slice, drop the hooks and deltas, make the weights trainable
        again: the model is a plain HF model, bit-identical to the base on masked slices. Idempotent."""
        while self._deltas:
            d = self._deltas.pop()
            d.handle.remove()
            d.weight.index_add_(d.dim, d.on_device(), d.delta.to(d.weight.dtype))
            delattr(d.module, DELTA)
            d.weight.requires_grad_(True)
        self._by_id = {}
