"""Accelerator construction: the one place that knows about CPU/gloo, DeepSpeed and FSDP quirks."""

from __future__ import annotations

import os
from datetime import timedelta

from fnscale.errors import UsageError


def _use_cpu() -> bool:
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not (
        torch.cuda.is_available() or (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    )


def check_launch_env() -> None:
    """Refuse launch settings that silently misbehave."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and _use_cpu():
        raise UsageError("FSDP on CPU runs unsynchronised copies in Accelerate; use DeepSpeed or DDP (launch_configs/cpu_2proc.yaml) on CPU")
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and ds_file and ds_file != "none":
        if not os.path.isfile(ds_file):
            raise UsageError(f"DeepSpeed config {ds_file} not found; fix deepspeed_config_file in your accelerate config")


def make_accelerator(gradient_accumulation_steps: int = 1, project_dir: str | None = None, log_with: str | None = None):
    """An Accelerator whose process group uses gloo on CPU (NCCL cannot run there), seeded data order."""
    check_launch_env()
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    kwargs = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs = [InitProcessGroupKwargs(backend="gloo" if _use_cpu() else None, timeout=timedelta(minutes=30))]
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir) if project_dir else None,
        kwargs_handlers=kwargs,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)
