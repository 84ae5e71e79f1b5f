"""Selections of neurons to read the ICA networks against: as many neurons per layer, chosen by another rule.

Each selection is saved as a networks file in the same format (one component), so it goes through the same
exact-freeze path in `fnscale train` and the same controls as the networks it is compared with. The rules:

- `activation`: the highest mean |activation| per neuron over the data's non-padding tokens, every token of every
  example counted once (a token-weighted mean), at the networks' capture site.
- `fisher`: the highest diagonal Fisher score of a per-neuron gate. A gate g (ones) multiplies each neuron's
  activation in the forward pass; per example e, L_e is the summed next-token NLL over its labelled tokens (the
  response tokens of SFT data, every token of text) and the score is F_j = (1/N) sum_e (dL_e/dg_j)^2 over the N
  examples, at g = 1. Per example, not per token: dL_e/dg_j = sum_t a_tj dL_e/da_tj sums over the example's tokens
  before squaring (the empirical Fisher of the gate under the example's log-likelihood).
- `random`: a seeded draw of the same size per layer, the very draw `train --mask-control random` makes.

Ties in a score are broken by the lower neuron index, so a selection is a function of the scores alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from fnscale.config import SELECTORS  # noqa: F401  (re-exported: the selector names)
from fnscale.data import IGNORE
from fnscale.errors import UsageError
from fnscale.models.mlp import find_mlp_layers
from fnscale.networks.controls import random_like
from fnscale.networks.templates import Templates

# ---------------------------------------------------------------- how many neurons per layer


def layer_counts(like: Templates, ids: Iterable[int] | None = None, share: float | None = None) -> dict[int, int]:
    """Neurons to pick in each captured layer of `like`: the size of the union of its chosen components there
    (`ids`, default all), or `share` of the layer's neurons (rounded)."""
    if share is not None:
        if ids is not None:
            raise UsageError("--share sets the counts by itself; drop --ica-component-ids, or drop --share")
        if not 0 < share < 1:
            raise UsageError(f"--share {share} must be between 0 and 1 (exclusive), e.g. 0.1")
        n = round(share * like.neurons_per_layer)
        if n < 1:
            raise UsageError(f"--share {share} selects no neuron of a layer of {like.neurons_per_layer}; raise it")
        return {layer: n for layer in like.layers}
    chosen = like.component_ids if ids is None else list(ids)
    counts = {layer: int(v.size) for layer, v in like.component_neurons(chosen).items()}
    if not any(counts.values()):
        raise UsageError(f"components {chosen} hold no neuron; choose others")
    return counts


# ---------------------------------------------------------------- choosing


def top_neurons(scores: Mapping[int, np.ndarray], counts: Mapping[int, int]) -> dict[int, np.ndarray]:
    """Per layer, the `counts[layer]` neurons of highest score (ties: lower index first), sorted by index."""
    out = {}
    for layer, n in sorted(counts.items()):
        order = np.argsort(-np.asarray(scores[layer], dtype=np.float64), kind="stable")
        out[layer] = np.sort(order[:n]).astype(np.int64)
    return out


def random_neurons(counts: Mapping[int, int], width: int, seed: int) -> dict[int, np.ndarray]:
    """`random_like` on placeholders of the right sizes: the draw `train --mask-control random` makes for these
    counts."""
    return random_like({layer: np.zeros(n, dtype=np.int64) for layer, n in counts.items()}, width, seed)


# ---------------------------------------------------------------- scores


@contextlib.contextmanager
def site_hooks(model, site: str, layers: Iterable[int], fn: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """While active, `fn(layer, x)` sees each chosen layer's neurons at `site` (batch x tokens x neurons); a tensor it
    returns replaces them. intermediate: the down projection's input; mlp_output: the MLP's output."""
    mlps = find_mlp_layers(model)
    handles = []

    def pre(layer):
        def hook(module, args):
            out = fn(layer, args[0])
            return None if out is None else (out, *args[1:])

        return hook

    def post(layer):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            out = fn(layer, x)
            if out is None:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    try:
        for layer in layers:
            mlp = mlps[layer]
            handles.append(
                mlp.down.register_forward_pre_hook(pre(layer))
                if site == "intermediate"
                else mlp.mlp.register_forward_hook(post(layer))
            )
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def activation_scores(model, batches: Iterable[dict], site: str, layers: list[int], device) -> dict[int, np.ndarray]:
    """Mean |activation| per neuron over every non-padding token of `batches` (collated: input_ids, attention_mask)."""
    sums: dict[int, torch.Tensor] = {}
    state = {"tokens": 0}

    def accumulate(layer, x):
        keep = state["keep"].to(x.device, torch.float32)
        total = torch.einsum("btn,bt->n", x.abs().float(), keep).double()
        sums[layer] = sums[layer] + total if layer in sums else total
        return None

    with _eval_mode(model), site_hooks(model, site, layers, accumulate):
        for batch in batches:
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            state["keep"] = attn
            model(input_ids=ids, attention_mask=attn, use_cache=False)
            state["tokens"] += int(attn.sum())
    if not state["tokens"]:
        raise UsageError("the data has no tokens to score; check --data")
    return {layer: (sums[layer] / state["tokens"]).cpu().numpy() for layer in layers}


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example, the summed next-token NLL over its labelled positions (labels != IGNORE); only those hit the
    softmax."""
    target = labels[:, 1:]
    keep = target != IGNORE
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
    rows = torch.nonzero(keep)[:, 0]  # the example of each labelled position
    return torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


def fisher_scores(model, batches: Iterable[dict], site: str, layers: list[int], device) -> dict[int, np.ndarray]:
    """Mean over examples of (dL_e/dg_j)^2 for a gate g of ones on each neuron (see the module docstring).

    One gate row per example (batch x 1 x neurons): example e's loss depends on its own row only, so one backward
    over the batch's summed loss gives every example's gate gradient; padding carries no label and adds nothing.
    """
    sums: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    n_examples = 0

    def gate(layer, x):
        gates[layer] = torch.ones(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
        return x * gates[layer]

    with _eval_mode(model), site_hooks(model, site, layers, gate):
        for batch in batches:
            ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            gates.clear()
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                loss = example_nll(logits, labels).sum()
                grads = torch.autograd.grad(loss, [gates[layer] for layer in layers], allow_unused=True)
            n_examples += ids.shape[0]
            for layer, g in zip(layers, grads):
                sq = (
                    torch.zeros(gates[layer].shape[-1], dtype=torch.float64)
                    if g is None
                    else g.float().square().sum((0, 1)).double().cpu()
                )
                sums[layer] = sums[layer] + sq if layer in sums else sq
    if not n_examples:
        raise UsageError("the data has no examples to score; check --data")
    return {layer: (sums[layer] / n_examples).numpy() for layer in layers}


# ---------------------------------------------------------------- the networks file


def selection_templates(like: Templates, neurons: Mapping[int, np.ndarray], how: dict, **meta) -> Templates:
    """One component (id 0) holding `neurons`, on `like`'s layers and site; `how` (selector, data, counts, seed, ...)
    is recorded in the file as `selection`. Other keyword arguments are metadata (model, datasets, token_counts)."""
    meta.setdefault("model", like.model)
    return Templates(
        layers=like.layers,
        neurons_per_layer=like.neurons_per_layer,
        components={0: {l: v for l, v in neurons.items() if len(v)}},
        site=like.site,
        scope="global",
        n_components=1,
        kind=how["by"],
        num_layers=like.num_layers,
        name=f"{how['by']} selection like {like.name or like.model or 'networks'}",
        selection=how,
        **meta,
    )
