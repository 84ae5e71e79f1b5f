"""Activation capture: hooks that stream the MLP neurons of chosen layers, non-padding tokens only.

Sites: `intermediate` (the down projection's input, where masks act; the default) and
`mlp_output` (the MLP's output, hidden-size channels, the site of Liu et al. 2025).

With `stop_early` (the default) a forward stops once every captured layer has run: the layers after the
last captured one and the LM head (over 20% of SmolLM2-135M's forward, its 49k-token vocabulary) would only
compute logits nobody reads. Callers turn it off where a forward must run to the end (ZeRO-3's collective
parameter gathers, accelerate's offload hooks).
"""

from __future__ import annotations

import torch

from fnscale.errors import UsageError
from fnscale.models.mlp import SITES, find_mlp_layers


class _Captured(Exception):
    """Raised by the hook that captures the last layer, to end the forward early (`stop_early`)."""


class ActivationCapture:
    """Context manager: while active, `run(batch)` returns tokens x (layers*width) float32 activations (a tensor)."""

    def __init__(self, model, site: str = "intermediate", layers: list[int] | None = None, stop_early: bool = True):
        if site not in SITES:
            raise UsageError(f"unknown capture site {site!r}; use {' or '.join(SITES)}")
        self.model, self.site = model, site
        all_layers = find_mlp_layers(model)
        self.layers = list(range(len(all_layers))) if layers is None else list(layers)
        self.num_layers = len(all_layers)
        self._mlps = [all_layers[i] for i in self.layers]
        self.width = self._mlps[0].width if site == "intermediate" else self._mlps[0].hidden
        self._store: dict[int, torch.Tensor] = {}
        self._handles = []
        self.stop_early = stop_early
        self._stopping = False  # set only inside run(): dummy() forwards always run to the end

    def __enter__(self):
        for pos, layer in enumerate(self._mlps):
            if self.site == "intermediate":
                self._handles.append(layer.down.register_forward_pre_hook(self._pre(pos)))
            else:
                self._handles.append(layer.mlp.register_forward_hook(self._post(pos)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()

    def _keep(self, pos, act) -> None:
        self._store[pos] = act.detach()
        if self._stopping and len(self._store) == len(self._mlps):
            raise _Captured

    def _pre(self, pos):
        def hook(module, args):
            self._keep(pos, args[0])

        return hook

    def _post(self, pos):
        def hook(module, args, output):
            self._keep(pos, output[0] if isinstance(output, tuple) else output)

        return hook

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One forward pass; the kept tokens' activations (tokens x layers*width, float32), layers concatenated in
        `self.layers` order, on the device of the first captured layer: they stay where they were computed."""
        self._store.clear()
        self._stopping = self.stop_early
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Captured:
            pass
        finally:
            self._stopping = False
        keep = attention_mask.reshape(-1).bool()
        device = self._store[0].device
        parts = []
        for pos in range(len(self._mlps)):
            act = self._store[pos]
            parts.append(act.reshape(-1, act.shape[-1])[keep.to(act.device)].to(device))
        return torch.cat(parts, dim=1).float()

    @torch.no_grad()
    def dummy(self, device) -> None:
        """A throw-away forward, so a rank with no batch left still joins ZeRO-3's collectives."""
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
