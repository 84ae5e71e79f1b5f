"""The activation cache of `templates build`: whether to keep captured activations, and how to keep them.

With a cache, template building runs one forward pass (statistics + PCA, keeping the activations) and
projects the kept activations afterwards; without one it recomputes the forward pass for the projection.
`--cache-budget-gb auto` (the default) caches when the activations fit in `AUTO_SHARE` of the memory
available after the model is loaded, split over the processes of this machine (the cache lives in host
memory on every device: activations are encoded where they were computed and only their float16 values are
copied to the CPU). A number is an explicit budget in GB per process; 0 turns the cache off.

Storage is float16 with a power-of-two scale per neuron per batch: values are divided by 2^e so the
largest |value| of each neuron lands in [2^14, 2^15), below fp16's 65504. That keeps fp16's 11-bit
mantissa (relative error <= 2^-11, 8x finer than bfloat16's) for activations of any magnitude; the
scale is exact in binary, so decoding adds no error. Cost: one float32 per neuron per batch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from fnscale.errors import UsageError

log = logging.getLogger(__name__)

AUTO_SHARE = 0.5  # of the memory available after loading the model, for the cache (all local processes together)
BYTES_PER_VALUE = 2  # float16


def parse_budget(value) -> float | None:
    """`auto` -> None; a number (or numeric string) >= 0 -> GB; anything else is refused."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = float("nan")
    if not (math.isfinite(gb) and gb >= 0):
        raise UsageError(f"--cache-budget-gb {value!r} must be `auto` or a number of GB >= 0 (0 turns the cache off)")
    return gb


def available_memory_bytes() -> int:
    """Host memory this process may still use: psutil's `available`, capped by a cgroup (container) limit."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    cgroup_files = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))
    for limit_file, usage_file in cgroup_files:
        try:
            limit = int(Path("/sys/fs/cgroup", limit_file).read_text().strip())
            used = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):  # no such file, or "max": no limit
            continue
        avail = min(avail, max(limit - used, 0))
    return avail


def local_processes() -> int:
    """Processes of this run on this machine (they share its host memory)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)


def plan_cache(budget, n_tokens: int, n_neurons: int, passes_after_first: int) -> bool:
    """Whether to cache this rank's activations; logs the decision and its numbers in one INFO line."""
    gb = parse_budget(budget)
    need = n_tokens * n_neurons * BYTES_PER_VALUE
    if passes_after_first == 0:
        log.info("activation cache: not needed (one pass over the model)")
        return False
    if gb is None:
        avail, procs = available_memory_bytes(), local_processes()
        allowed = AUTO_SHARE * avail / procs
        why = f"{AUTO_SHARE:.0%} of {avail / 2**30:.2f} GB available"
        why += f" / {procs} local processes" if procs > 1 else ""
    else:
        allowed, why = gb * 2**30, "--cache-budget-gb" if gb > 0 else "--cache-budget-gb 0: cache off"
    use = 0 < need <= allowed
    log.info(
        "activation cache: %s (%d tokens x %d neurons fp16 = %.2f GB, allowed %.2f GB: %s)%s",
        "on, 1 forward pass" if use else "off, streaming",
        n_tokens,
        n_neurons,
        need / 2**30,
        allowed / 2**30,
        why,
        "" if use else f"; {1 + passes_after_first} forward passes",
    )
    return use


def encode(acts) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tokens x neurons (a tensor on any device) -> (float16 values, float32 per-neuron power-of-two
    scale), both in host memory. Encoded where the activations are, so only the float16 values cross to the host."""
    acts = torch.as_tensor(acts)
    peak = acts.abs().amax(0) if len(acts) else acts.new_zeros(acts.shape[1])
    _, exp = torch.frexp(torch.where(torch.isfinite(peak), peak, 0.0))  # peak < 2^exp
    # 2^(exp-15) built from its bits, so it is exact; the clamp keeps it a normal float32 for the tiniest peaks
    scale = ((exp.clamp(-111, 142) - 15 + 127).to(torch.int32) << 23).view(torch.float32)
    return (acts / scale).half().cpu(), scale.cpu()


def decode(values: torch.Tensor, scale: torch.Tensor, device=None) -> torch.Tensor:
    """The float32 activations back, on `device` (only the float16 values are copied there)."""
    return values.to(device).float() * scale.to(device)
