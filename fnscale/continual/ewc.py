"""Elastic weight consolidation (Kirkpatrick et al. 2017) with an accumulated diagonal Fisher ("online" EWC, gamma = 1).

After stage t of a sequence, the empirical Fisher of task t is estimated with the stage's model on task t's
training data, F_t = (1/N) sum_n (d loss_n / d theta)^2 (loss_n: one example's mean token NLL, as in training),
and added to the earlier tasks' Fisher: F = F_1 + ... + F_t. Stage t+1 then minimises

    loss + lambda/2 * sum_k F_k (theta_k - theta*_k)^2,      theta* = the weights stage t+1 starts from,

i.e. every parameter's gradient gets lambda * F * (theta - theta*). `install` adds that term with gradient hooks,
so the training loop needs one call and nothing else: each hook adds lambda * F * (theta - theta*) / A per
micro-batch (A = gradient accumulation steps; Accelerate divides each micro-batch's loss by A, so the optimizer step
sees the whole penalty gradient once). Gradient clipping and the skip of non-finite steps treat it as part of the loss.
The state file (safetensors) holds F per parameter name; theta* is read from the model folder named in its metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fnscale.errors import UsageError
from fnscale.runtime.atomic import atomic_path

log = logging.getLogger(__name__)


def fisher_diagonal(model, items: list[dict], pad_id: int, device, max_samples: int = 64) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the trainable parameters: mean over up to `max_samples` examples of the squared
    gradient of each example's mean token NLL (float32, on the CPU)."""
    from fnscale import data

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    chosen = items[:max_samples]
    if not chosen:
        raise UsageError("EWC: no training examples to estimate the Fisher information on")
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    for item in chosen:
        batch = {k: v.to(device) for k, v in data.collate([item], pad_id).items()}
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float().cpu() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / len(chosen) for n, f in fisher.items()}


def accumulate(fisher: dict[str, torch.Tensor], previous: str | Path | None) -> dict[str, torch.Tensor]:
    """F_1 + ... + F_t: this task's Fisher plus the one saved after the previous stage."""
    if not previous:
        return fisher
    from safetensors.torch import load_file

    old = load_file(str(previous))
    return {n: f + old[n] if n in old else f for n, f in fisher.items()}


def save_state(path: str | Path, fisher: dict[str, torch.Tensor], anchor: str | Path, tasks: list[str]) -> Path:
    """The Fisher per parameter name; `anchor` is the model folder whose weights are theta* for the next stage."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {n: f.contiguous() for n, f in fisher.items()},
            str(tmp),
            metadata={"anchor": str(anchor), "tasks": ",".join(tasks)},
        )
    return Path(path)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Fisher, theta*) by parameter name; theta* comes from the anchor model folder's safetensors files."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UsageError(f"--ewc-state {path} not found; `fnscale cl` writes it after each stage of an EWC arm")
    with safe_open(str(path), "pt") as f:
        anchor = Path((f.metadata() or {}).get("anchor", ""))
    files = sorted(anchor.glob("*.safetensors")) if anchor.is_dir() else []
    if not files:
        raise UsageError(f"--ewc-state {path}: its anchor model folder {anchor} has no safetensors weights")
    theta = {}
    for file in files:
        theta.update(load_file(str(file)))
    return load_file(str(path)), theta


def penalty(model, fisher: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lambda/2 * sum F (theta - theta*)^2 over the named parameters (a reference for tests and logs)."""
    total = None
    for n, p in model.named_parameters():
        if n in fisher:
            term = (fisher[n].to(p.device, p.dtype) * (p - theta[n].to(p.device, p.dtype)) ** 2).sum()
            total = term if total is None else total + term
    return lam / 2 * total if total is not None else torch.zeros(())


class EWCHooks:
    """Gradient hooks adding lambda * F * (theta - theta*) / accumulation to every penalised parameter's gradient."""

    def __init__(
        self, model, fisher: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], lam: float, accumulation: int = 1
    ):
        self.handles, self.names = [], []
        scale = lam / accumulation
        for n, p in model.named_parameters():
            if not p.requires_grad or n not in fisher:
                continue
            if n not in theta or theta[n].shape != p.shape or fisher[n].shape != p.shape:
                raise UsageError(
                    f"EWC state does not fit the model: parameter {n} is missing or has another shape; rebuild it"
                )
            f = fisher[n].to(p.device, p.dtype)
            anchor = theta[n].to(p.device, p.dtype)
            self.handles.append(p.register_hook(_hook(p, f, anchor, scale)))
            self.names.append(n)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _hook(p, f, anchor, scale):
    def add_penalty(grad):
        return grad + scale * f * (p.detach() - anchor)

    return add_penalty


def install(cfg, model, accelerator=None) -> EWCHooks | None:
    """The train recipe's one call: EWC hooks when --ewc-state is given, else nothing. Call it before resuming
    (theta* is read from the anchor folder either way) and before `accelerator.prepare` wraps the model."""
    if not getattr(cfg, "ewc_state", None):
        if getattr(cfg, "ewc_lambda", 0):
            raise UsageError("--ewc-lambda needs --ewc-state (the Fisher file `fnscale cl` writes after each stage)")
        return None
    if cfg.lora:
        raise UsageError("EWC penalises the full weights; train with --no-lora")
    if accelerator is not None:
        from fnscale.runtime.distributed import uses_deepspeed

        if uses_deepspeed(accelerator):
            raise UsageError(
                "EWC adds its gradient on whole parameters, which DeepSpeed ZeRO partitions; "
                "run EWC on one device or with DDP"
            )
    fisher, theta = load_state(cfg.ewc_state)
    hooks = EWCHooks(model, fisher, theta, cfg.ewc_lambda, cfg.gradient_accumulation_steps)
    log.info("EWC: lambda %g on %d parameter tensors (%s)", cfg.ewc_lambda, len(hooks.names), cfg.ewc_state)
    return hooks
