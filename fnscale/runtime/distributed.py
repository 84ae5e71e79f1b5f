"""Accelerator construction: the one place that knows about CPU/gloo, DeepSpeed and FSDP quirks.

What `accelerate launch` leaves to the script, fixed here so that every launch config in
`launch_configs/` behaves the same on CPU and GPU:

- A MULTI_GPU config with `use_cpu: true` does not export ACCELERATE_USE_CPU to the workers, so a
  plain `Accelerator()` on a CPU machine sets up a process group but no DDP: every rank trains its own
  unsynchronised copy. On CPU we ask for `cpu=True` (DDP over gloo) explicitly.
- DeepSpeed on CPU must *not* see ACCELERATE_USE_CPU (Accelerate then silently falls back to plain DDP)
  and needs the gloo backend (DeepSpeed's `init_distributed` is given it through InitProcessGroupKwargs).
- FSDP on CPU is refused; a relative `deepspeed_config_file` is also looked up beside this checkout and in the
  installed package (`fnscale launch-configs` prints where the shipped configs are).
- After construction, a multi-process launch that did not end up synchronised is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

from fnscale.errors import RunError, UsageError

log = logging.getLogger(__name__)

# Where a relative `launch_configs/...` DeepSpeed JSON path is also looked up: the checkout (source tree or editable
# install), then the installed package, which ships launch_configs/ as fnscale/launch_configs/.
REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_joined = {"group": False}  # set once this process has joined a multi-process group (see exit_process)
DEFAULT_TIMEOUT_S = (
    1800  # collectives wait this long for a live peer (a first GGUF conversion or a large ZeRO-3 save can take minutes)
)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _has_accelerator_device() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return True
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _use_cpu() -> bool:
    """True when the run is on CPU: asked for (ACCELERATE_USE_CPU) or nothing else is there."""
    return _truthy("ACCELERATE_USE_CPU") or not _has_accelerator_device()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _requested_deepspeed() -> bool:
    return _truthy("ACCELERATE_USE_DEEPSPEED")


def _requested_fsdp() -> bool:
    # `accelerate launch` exports ACCELERATE_USE_FSDP=true for distributed_type: FSDP (FSDP1 and FSDP2).
    return _truthy("ACCELERATE_USE_FSDP")


def launch_configs_folder() -> Path:
    """The shipped launch_configs/: the checkout's, or the installed package's copy."""
    folders = (REPO_ROOT / "launch_configs", PACKAGE_ROOT / "launch_configs")
    return next((p for p in folders if p.is_dir()), folders[1])


def _resolve_deepspeed_config_file() -> None:
    """Check the DeepSpeed JSON exists; a relative path missing from the working folder is looked up in the checkout."""
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not ds_file or ds_file == "none" or os.path.isfile(ds_file):
        return
    for fallback in (REPO_ROOT / ds_file, PACKAGE_ROOT / ds_file):
        if not os.path.isabs(ds_file) and fallback.is_file():
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(fallback)
            return
    raise UsageError(
        f"DeepSpeed config {ds_file} not found (relative paths are read from the working folder {os.getcwd()}); "
        "fix deepspeed_config_file in your accelerate config or run from the repository root"
    )


def check_launch_env() -> None:
    """Refuse launch settings that silently misbehave."""
    if _requested_fsdp() and _use_cpu():
        raise UsageError(
            "FSDP does not run on CPU under Accelerate (the ranks would silently train unsynchronised copies); on CPU "
            "use DDP (launch_configs/cpu_2proc.yaml) "
            "or DeepSpeed (launch_configs/cpu_2proc_zero2.yaml / cpu_2proc_zero3.yaml)"
        )
    if _requested_deepspeed():
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError(
                "the launch config asks for DeepSpeed but it is not installed; `pip install deepspeed` or pick a DDP "
                "config"
            )
        _resolve_deepspeed_config_file()
        if _truthy("ACCELERATE_USE_CPU") and _has_accelerator_device():
            raise UsageError(
                "DeepSpeed with use_cpu: true on a machine with a GPU would mix devices; drop use_cpu (or use a DDP "
                "config for CPU)"
            )


def _auto_deepspeed_precision() -> None:
    """DeepSpeed JSON with bf16/fp16 "auto" and no --mixed_precision: bf16 on GPUs that support it, else fp16.

    Accelerate refuses mixed_precision in a launch YAML that points at a DeepSpeed JSON and resolves "auto"
    to off, which would train a GPU run without mixed precision; this mirrors fnscale's --dtype auto.
    On CPU nothing changes (fp32).
    """
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() not in ("", "no") or _use_cpu():
        return
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return  # Accelerate reports a malformed file itself
    if all(str((cfg.get(k) or {}).get("enabled", "")).lower() == "auto" for k in ("bf16", "fp16")):
        import torch

        os.environ["ACCELERATE_MIXED_PRECISION"] = (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
        )


def launch_device_type() -> str:
    """The device type the Accelerator of this process will pick ("cpu", "cuda", "xpu", "mps"), before it exists."""
    import torch

    if _use_cpu():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return "xpu"
    return "mps"


def launch_mixed_precision() -> str | None:
    """The launch config's mixed_precision ("bf16", "fp16"), or None when it names none."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    return value if value in ("bf16", "fp16") else None


def make_accelerator(
    gradient_accumulation_steps: int = 1,
    project_dir: str | None = None,
    log_with: str | None = None,
    max_grad_norm: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    mixed_precision: str | None = None,
):
    """An Accelerator whose process group uses gloo on CPU (NCCL cannot run there), seeded data order.

    Under DeepSpeed, clipping happens inside the engine: `max_grad_norm` fills the config's "auto"
    gradient_clipping (Accelerate would otherwise put 1.0 there whatever the run asked for).
    `timeout_s` bounds every collective (--ddp-timeout): a rank stuck in a live but silent peer gives up after it.
    `mixed_precision` ("no", "bf16", "fp16"; None: the launch config's) applies outside DeepSpeed, whose JSON decides.
    """
    check_launch_env()
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    if _requested_deepspeed():
        _auto_deepspeed_precision()
    multi = world_size() > 1
    cpu = _use_cpu()
    kwargs, force_cpu = [], False
    if multi:
        kwargs = [InitProcessGroupKwargs(backend="gloo" if cpu else None, timeout=timedelta(seconds=timeout_s))]
        if cpu and _requested_deepspeed():
            # Accelerate skips DeepSpeed entirely when it believes it runs on CPU; DeepSpeed picks its CPU accelerator
            # itself.
            os.environ["ACCELERATE_USE_CPU"] = "false"
        elif cpu:
            force_cpu = True  # MULTI_CPU: DDP over gloo
    if _requested_deepspeed():
        mixed_precision = None
    if not multi and mixed_precision is not None:
        _forget_other_precision(mixed_precision)
    accelerator = Accelerator(
        cpu=force_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir) if project_dir else None,
        kwargs_handlers=kwargs,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    from accelerate.utils import DistributedType

    if multi and (accelerator.num_processes != world_size() or accelerator.distributed_type == DistributedType.NO):
        raise RunError(
            f"launched {world_size()} processes but Accelerate set up {accelerator.distributed_type.value} with "
            f"{accelerator.num_processes}: the ranks would train unsynchronised copies; check the launch config"
        )
    if max_grad_norm is not None and uses_deepspeed(accelerator):
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        current = ds_cfg.get("gradient_clipping", "auto")
        if current == "auto":
            ds_cfg["gradient_clipping"] = float(max_grad_norm)
        elif float(current) != float(max_grad_norm) and accelerator.is_main_process:
            log.warning(
                'the DeepSpeed config clips gradients at %s; --max-grad-norm %s does not apply (set it to "auto")',
                current,
                max_grad_norm,
            )
    _joined["group"] = multi
    if accelerator.is_main_process:
        log.info("distributed: %s", describe(accelerator))
    return accelerator


def _forget_other_precision(mixed_precision: str) -> None:
    """One process that runs train() twice (tests, notebooks) with another precision: Accelerate keeps its state per
    process and refuses a change, so the stale state is dropped (a launched rank builds one Accelerator)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def describe(accelerator) -> str:
    """One line for logs: 'DEEPSPEED ZeRO-3, 2 processes, backend gloo, device cpu'."""
    kind = accelerator.distributed_type.value
    if uses_deepspeed(accelerator):
        kind += f" ZeRO-{zero_stage(accelerator)}"
    backend = getattr(accelerator.state, "backend", None) or "none"
    return f"{kind}, {accelerator.num_processes} process(es), backend {backend}, device {accelerator.device}"


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def broadcast_from_main(obj, accelerator):
    """The main process's `obj` on every rank (pickled); other ranks may pass anything, e.g. None.
    A no-op without an accelerator or with a single process."""
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def zero_stage(accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


@contextlib.contextmanager
def zero3_init_disabled(accelerator):
    """Load models whole (not ZeRO-3 partitioned) inside this block, e.g. on one rank to merge an adapter.

    Under ZeRO-3, Accelerate registers the DeepSpeed config with transformers (whatever zero3_init_flag
    says), so `from_pretrained` partitions the weights with collective calls, which hang when only the
    main process loads.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def deepspeed_param_dtype(accelerator):
    """The dtype DeepSpeed casts the model's floating-point parameters to (bf16/fp16 enabled), else None."""
    import torch

    if not uses_deepspeed(accelerator):
        return None
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    if str(cfg.get("bf16", {}).get("enabled")).lower() == "true":
        return torch.bfloat16
    if str(cfg.get("fp16", {}).get("enabled")).lower() == "true":
        return torch.float16
    return None


def check_quantized_launch(accelerator, load_in_4bit: bool, load_in_8bit: bool, dtype) -> None:
    """Refuse bitsandbytes + DeepSpeed combinations that fail or silently do not shard (verified on CPU, see
    docs/cluster.md)."""
    if load_in_8bit and zero_stage(accelerator) == 3:
        raise UsageError(
            "--load-in-8bit with ZeRO-3: bitsandbytes 8-bit layers keep a whole copy of their int8 weights on every "
            "rank "
            "after the first forward, so ZeRO-3 cannot shard them; use --load-in-4bit with ZeRO-3, or 8-bit with DDP "
            "or ZeRO-2"
        )
    ds_dtype = deepspeed_param_dtype(accelerator)
    if load_in_4bit and ds_dtype is not None and ds_dtype != dtype:
        name = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
        want, have = name.get(str(ds_dtype), str(ds_dtype)), name.get(str(dtype), str(dtype))
        raise UsageError(
            f"DeepSpeed casts parameters to {want} (mixed_precision of the launch config), which would corrupt 4-bit "
            "weights "
            f"packed in {have}; pass --dtype {want} so the 4-bit storage matches, or use mixed_precision: 'no'"
        )


@contextlib.contextmanager
def zero3_gathering(model, accelerator):
    """Forwards of a ZeRO-3 partitioned `model` (loaded under zero.Init) gather each module's parameters as they go.

    Each module that owns partitioned parameters (those with a `ds_id`) gathers them in a forward pre-hook
    (`deepspeed.zero.GatheredParameters`) and releases them in its forward hook, so `model(...)` itself runs
    partitioned, capture hooks included, while parameters added after loading (a LoRA adapter, not yet
    partitioned) are left as they are: the weight guard can still zero their masked slices before `prepare`.
    No DeepSpeed engine is built, so the same model is then prepared for training as usual.
    A no-op outside ZeRO-3. Every rank must run the same number of forwards (the gathers are collective).
    """
    if zero_stage(accelerator) != 3:
        yield model
        return
    import deepspeed

    held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
    total = sum(p.ds_numel for p in model.parameters() if hasattr(p, "ds_numel"))
    log.info(
        "ZeRO-3 forward: rank %d holds %d of %d parameter elements (partitioned)",
        accelerator.process_index,
        held,
        total,
    )
    open_gathers: dict[
        int, list
    ] = {}  # module id -> its entered GatheredParameters (a stack: a module may be re-entered)

    def gather(module, args):
        ctx = deepspeed.zero.GatheredParameters([p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")])
        ctx.__enter__()
        open_gathers.setdefault(id(module), []).append(ctx)

    def release(module, args, output):
        if open_gathers.get(id(module)):  # empty when the gather itself failed: let that error through
            open_gathers[id(module)].pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(gather, prepend=True))
            handles.append(module.register_forward_hook(release, always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- clean exits and failures every rank agrees on


def _live_group():
    """torch.distributed when its default group is initialised, else None; never imports torch (`fnscale --help`)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def shutdown() -> None:
    """Destroy the default process group if one was initialised, releasing its connections (an NCCL communicator
    included) before the process exits; a no-op otherwise."""
    dist = _live_group()
    if dist is None:
        return
    try:
        dist.destroy_process_group()
    except Exception as err:  # a group already broken by a dead peer: nothing left to release
        log.debug("destroy_process_group: %s", err)


def joined_group() -> bool:
    """Whether this process joined a multi-process group (it may have been destroyed since, by `end_training`)."""
    return _joined["group"] or _live_group() is not None


def exit_process(code) -> None:
    """Leave a rank of a multi-process run with the command's own status, skipping interpreter teardown.

    After a success the ranks meet at a barrier; each destroys its group, flushes and leaves with `os._exit`, because
    a gloo worker thread still freeing tensors during finalisation aborts the process (docs/architecture.md, "Process
    exit"). A process that never joined a group (one process, a mistake refused first) returns and exits normally."""
    import sys

    if not joined_group():
        return
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    dist = _live_group()
    if status == 0 and dist is not None:
        try:
            dist.barrier()
        except Exception as err:  # a peer gone after a success: nothing left to wait for
            log.debug("exit barrier: %s", err)
    shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _describe_error(err: BaseException) -> str:
    from fnscale.errors import FnscaleError

    return str(err) if isinstance(err, FnscaleError) else f"{type(err).__name__}: {err}"


def rank_failures(accelerator, error: BaseException | None) -> list[tuple[int, str]]:
    """(rank, message) of every rank that failed, the same list on every rank (one object gather)."""
    if accelerator.num_processes == 1:
        return [] if error is None else [(accelerator.process_index, _describe_error(error))]
    import torch.distributed as dist

    statuses = [None] * accelerator.num_processes
    dist.all_gather_object(statuses, None if error is None else _describe_error(error))
    return [(rank, msg) for rank, msg in enumerate(statuses) if msg is not None]


def raise_if_any_failed(accelerator, error: BaseException | None, what: str) -> None:
    """A status exchange in place of a barrier: every rank learns whether one failed during `what`, and all raise.

    The failing rank re-raises its own error (its exit code and message); the others raise a RunError that quotes
    it, so no rank waits on a peer that is exiting. With one process the error is simply re-raised.
    """
    failed = rank_failures(accelerator, error)
    if failed and error is None:
        rank, msg = failed[0]
        raise RunError(f"rank {rank} failed while {what}: {msg}")
    if error is not None:
        raise error
