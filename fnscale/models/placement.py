"""One process, several devices: `--device-map auto` for `templates build` and `eval` (no DeepSpeed).

Accelerate's big-model inference places the layers over this node's GPUs, then the CPU, then disk
(`--offload-folder`), and moves activations between them in the forward; hooks and scoring see an
ordinary model. `--max-memory` caps each device:

- `0=20GiB,1=20GiB,cpu=64GiB`: comma-separated DEVICE=SIZE, DEVICE a GPU index (or cuda:N), cpu, mps
  or disk, SIZE bytes or a number with a unit (KB, MB, GB, KiB, MiB, GiB, ...);
- or a .json/.yaml/.yml file holding the same as a mapping, e.g. `{0: 20GiB, cpu: 64GiB}`.
"""

from __future__ import annotations

import os

from fnscale.config import DEVICE_MAPS
from fnscale.errors import UsageError

_NAMED = ("cpu", "mps", "disk")


def _device_key(key) -> int | str:
    text = str(key).strip().lower()
    text = text[5:] if text.startswith("cuda:") else text
    if text.isdigit():
        return int(text)
    if text in _NAMED:
        return text
    raise UsageError(
        f"--max-memory: unknown device {key!r}; use a GPU index (0, 1, ...), cpu, mps or disk, e.g. 0=20GiB,cpu=64GiB"
    )


def _size(device, value) -> int | str:
    from accelerate.utils import convert_file_size_to_int

    try:
        convert_file_size_to_int(value)
    except (ValueError, TypeError):
        raise UsageError(
            f"--max-memory: bad size {value!r} for {device}; use bytes or a number with a unit, e.g. 20GiB or 500MB"
        ) from None
    return value


def parse_max_memory(spec: str | None) -> dict[int | str, int | str] | None:
    """`0=20GiB,cpu=64GiB` or a JSON/YAML file of the same mapping -> {0: "20GiB", "cpu": "64GiB"}; None stays None."""
    if spec is None or not str(spec).strip():
        return None
    if str(spec).lower().endswith((".json", ".yaml", ".yml")):
        from fnscale.config import read_yaml

        raw = read_yaml(spec, "--max-memory file")
        if not isinstance(raw, dict) or not raw:
            raise UsageError(
                f"--max-memory file {spec} must hold a mapping of device: size, e.g. {{0: 20GiB, cpu: 64GiB}}"
            )
        pairs = list(raw.items())
    else:
        pairs = []
        for part in str(spec).split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise UsageError(
                    f"--max-memory: bad entry {part.strip()!r}; use DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB"
                )
            pairs.append((key, value.strip()))
    out: dict[int | str, int | str] = {}
    for key, value in pairs:
        device = _device_key(key)
        out[device] = _size(device, value)
    return out


def placement(device_map: str | None, max_memory: str | None, offload_folder: str | None) -> dict | None:
    """from_pretrained keyword arguments for a model split over devices, or None for an ordinary load.

    Refuses a multi-process launch (each process would place a whole copy) and the memory flags alone."""
    if device_map is None:
        if max_memory or offload_folder:
            raise UsageError("--max-memory and --offload-folder apply with --device-map auto; add it or drop them")
        return None
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"unknown --device-map {device_map!r}; use auto")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError(
            "--device-map auto splits one model copy over this node's devices in one process; run it without "
            "`accelerate launch` (for several processes use a ZeRO-3 launch config instead)"
        )
    kwargs: dict = {"device_map": device_map}
    memory = parse_max_memory(max_memory)
    if memory is not None:
        kwargs["max_memory"] = memory
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    return kwargs


def input_device(model):
    """Where a split model takes its inputs: the device of its first placed module (disk/cpu -> cpu)."""
    import torch

    placed = getattr(model, "hf_device_map", None) or {}
    first = next(iter(placed.values()), "cpu")
    if isinstance(first, int):
        return torch.device("cuda", first)
    return torch.device("cpu" if first in ("cpu", "disk") else first)


def summary(model) -> str:
    """'cpu: 5 modules, disk: 7 modules' from the model's hf_device_map (where its layers were placed)."""
    counts: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return ", ".join(f"{where}: {n} modules" for where, n in counts.items()) or "one device"
