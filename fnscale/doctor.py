"""`fnscale doctor`: what this machine can run, in one screen."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

PACKAGES = [
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "deepspeed",
    "bitsandbytes",
    "triton",
    "cuml",
    "scikit-learn",
    "safetensors",
    "gguf",
    "tensorboard",
    "huggingface_hub",
    "lm_eval",
]
OPTIONAL = {
    "triton": "fused mask kernels (CUDA)",
    "cuml": "GPU PCA",
    "bitsandbytes": "QLoRA / 8-bit",
    "deepspeed": "ZeRO-2/3",
    "lm_eval": "lm-eval harness tasks in fnscale eval",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> str:
    import torch

    from fnscale.models.loading import hf_token, pick_device
    from fnscale.models.paths import default_gguf_path

    lines = [
        f"fnscale     {_version('fnscale') or 'source tree'}",
        f"python      {sys.version.split()[0]}",
        f"platform    {platform.platform()}",
    ]
    dev = pick_device()
    lines.append(f"device      {dev.type}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"  cuda:{i}    {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16={torch.cuda.is_bf16_supported()}"
            )
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"mps         {'available' if mps is not None and mps.is_available() else 'no'}")
    lines.append("packages")
    for name in PACKAGES:
        dist = {"lm_eval": "lm-eval", "cuml": "cuml"}.get(name, name)
        v = _version(dist) or (_version("cuml-cu12") if name == "cuml" else None)
        note = f"  ({OPTIONAL[name]})" if name in OPTIONAL else ""
        lines.append(f"  {name:16s} {v or 'not installed'}{note}")
    try:
        lines.append(f"default model  {default_gguf_path()}")
    except Exception as err:  # reported, not fatal
        lines.append(f"default model  missing: {err}")
    lines.append(
        f"hf token    {'found' if hf_token() else 'not found (only needed for gated models and --push-to-hub)'}"
    )
    return "\n".join(lines)
