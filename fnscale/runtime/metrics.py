"""metrics.jsonl beside the TensorBoard events: one JSON object per logged step, for scripts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fnscale.runtime.atomic import write_text


class MetricsLog:
    """Appends one line per record and fsyncs it, so a crash never leaves a half line."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop lines past the checkpoint we resume from: those steps are about to be redone.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _step(line) is not None and _step(line) <= resume_step
            ]
            write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
