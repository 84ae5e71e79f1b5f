"""Which attention kernel a training run uses, and whether packed rows stay inside their examples with it.

`auto` picks FlashAttention-2 (varlen over packed examples) on CUDA when `flash_attn` is installed and
--packing is on, and otherwise keeps transformers' default (SDPA where the model supports it). SDPA and
eager honour packing through the block-diagonal mask transformers builds from restarting `position_ids`;
that holds for models on transformers' attention interface, which `check_packing` asks of the model.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from fnscale.config import ATTN_IMPLEMENTATIONS
from fnscale.errors import UsageError

log = logging.getLogger(__name__)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def check(choice: str, packing: bool, group_by_length: bool, dtype: str) -> None:
    """Impossible combinations, before any model is loaded."""
    if choice not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"unknown --attn-implementation {choice!r}; use {', '.join(ATTN_IMPLEMENTATIONS)}")
    if packing and group_by_length:
        raise UsageError("--packing already fills rows with whole examples; drop --group-by-length")
    if choice != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UsageError(
            "--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); or use sdpa"
        )
    if not torch.cuda.is_available():
        raise UsageError("--attn-implementation flash_attention_2 needs a CUDA GPU; use sdpa on CPU/MPS")
    if dtype == "float32":
        raise UsageError(
            "flash_attention_2 runs in bfloat16/float16; use --dtype bfloat16 or --attn-implementation sdpa"
        )


def configure(model, choice: str, packing: bool, device: torch.device) -> str:
    """Set the attention implementation on the (possibly PEFT-wrapped) model; returns the one in use."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = choice
    if choice == "auto":
        wanted = "flash_attention_2" if packing and device.type == "cuda" and flash_available() else None
    if wanted is not None and wanted != base.config._attn_implementation:
        try:
            base.set_attn_implementation(wanted)
        except (ValueError, ImportError) as err:
            first = str(err).splitlines()[0][:200]
            raise UsageError(
                f"--attn-implementation {wanted}: {type(base).__name__} refuses it ({first}); use sdpa or eager"
            ) from err
    if packing:
        check_packing(base)
    used = base.config._attn_implementation
    log.info("attention: %s%s", used, " (packed rows, position_ids restart per example)" if packing else "")
    return used


def check_packing(model) -> None:
    """Packing needs a model whose masks come from `position_ids` restarts (transformers' attention interface)."""
    if not getattr(type(model), "_supports_attention_backend", False):
        raise UsageError(
            f"--packing: {type(model).__name__} does not build its attention mask from position_ids, so packed "
            "examples would attend to each other; use --group-by-length instead"
        )
