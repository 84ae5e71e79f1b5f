"""Paired differences between two configurations of a sweep, with a Student t interval.

Runs of the same seed share their data order and initial state, so the difference a - b is taken seed by seed and
its mean is read against the spread of those differences: the 95% interval is mean ± t(0.975, n-1) · sd / sqrt(n)
(Student's t with n-1 degrees of freedom, n the number of seeds both configurations finished). An interval that
holds 0 means the difference is not shown, whatever its sign.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

LEVEL = 0.95
METHOD = "paired by seed; 95% interval from Student's t with n-1 degrees of freedom"


def paired_difference(a: Mapping[int, float | None], b: Mapping[int, float | None], level: float = LEVEL) -> dict:
    """Seed-by-seed differences a[s] - b[s] over the seeds both hold with finite values: n, the seeds, mean, sd, the
    interval (`low`, `high`), Student's t and its two-sided p, and `excludes_zero` (None below 2 seeds)."""
    from scipy.stats import t as student_t

    seeds = sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    out = {
        "n": len(diffs),
        "seeds": seeds,
        "mean": statistics.fmean(diffs) if diffs else None,
        "sd": None,
        "low": None,
        "high": None,
        "t": None,
        "p": None,
        "excludes_zero": None,
        "level": level,
    }
    if len(diffs) < 2:
        return out
    n, sd = len(diffs), statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, low=out["mean"] - half, high=out["mean"] + half)
    if sd > 0:
        out["t"] = out["mean"] / (sd / math.sqrt(n))
        out["p"] = float(2 * student_t.sf(abs(out["t"]), n - 1))
    out["excludes_zero"] = bool(out["low"] > 0 or out["high"] < 0)
    return out


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)
