"""`--report-to`: several metric trackers through Accelerate (tensorboard, wandb, mlflow, or none).

TensorBoard events stay in OUTPUT_DIR/tensorboard; wandb and mlflow get the project `fnscale`. Optional
trackers are checked before the model loads, and a missing one names the pip package to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fnscale.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "fnscale"


def parse(spec) -> list[str]:
    """Tracker names from `a,b` or a list of them; `none` (alone) means no tracker."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or ())
    names = list(dict.fromkeys(n.strip().lower() for n in items if n and n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UsageError(f"unknown --report-to {', '.join(unknown)}; use any of {', '.join(TRACKERS)}, comma-separated")
    if "none" in names and len(names) > 1:
        raise UsageError("--report-to none cannot be combined with other trackers")
    names = [n for n in names if n != "none"]
    for n in names:
        if importlib.util.find_spec(PACKAGES[n]) is None:
            raise UsageError(f"--report-to {n} needs the {PACKAGES[n]} package: pip install {PACKAGES[n]}")
    return names


def log_with(spec, output_dir: str | Path) -> list | None:
    """What `Accelerator(log_with=...)` takes: TensorBoard writing to OUTPUT_DIR/tensorboard, the others by name."""
    names = parse(spec)
    if not names:
        return None
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("tensorboard", str(output_dir)) if n == "tensorboard" else n for n in names]
