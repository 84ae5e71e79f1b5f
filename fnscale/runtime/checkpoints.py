"""Checkpoints: atomic folders, a completeness marker, rotation, and finding the latest good one."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from fnscale.errors import UsageError
from fnscale.runtime.atomic import write_json

log = logging.getLogger(__name__)
PREFIX = "checkpoint-"
STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders in step order (oldest first)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := re.fullmatch(PREFIX + r"(\d+)", p.name))
    ]
    return [p for _, p in sorted(found)]


def read_state(ckpt: Path) -> dict | None:
    try:
        state = json.loads((ckpt / STATE).read_text())
        return state if isinstance(state, dict) and "step" in state else None
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(ckpt: Path) -> bool:
    return read_state(ckpt) is not None


def resolve_resume(spec: str | None, output_dir: str | Path) -> list[Path]:
    """Candidates to resume from, best first: `auto` gives every complete checkpoint, newest first."""
    if not spec:
        return []
    if spec == "auto":
        found = checkpoint_dirs(output_dir)
        good = [p for p in reversed(found) if is_complete(p)]
        for p in reversed(found):
            if p not in good:
                log.warning("checkpoint %s is incomplete or corrupt; skipping it", p)
        return good
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"--resume-from-checkpoint {spec} not found; pass a checkpoint folder or `auto`")
    if not is_complete(path):
        raise UsageError(f"{spec} is not a complete checkpoint (no {STATE}); pick another or use `auto`")
    return [path]


def finish(tmp: Path, target: Path, state: dict) -> None:
    """Mark a checkpoint complete (state file last), then move it into place."""
    write_json(tmp / STATE, state)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def rotate(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
