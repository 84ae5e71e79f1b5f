"""The accuracy matrix R of a task sequence and what is read from it.

R[i][j] is task j's score after training stage i (rows and columns in training order, both 0-based here).
Every cell is "higher is better": accuracy-type metrics in points (0-100), loss tasks as minus the task loss.
With T tasks, b_j the base model's score and s_j the score of a model fine-tuned on task j alone from the base:

- AA  = (1/T) sum_j R[T-1][j]                                   average score after the last stage
- BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])               negative = forgetting
- FWT (base, Lopez-Paz & Ranzato 2017)  = 1/(T-1) sum_{j>0} (R[j-1][j] - b_j)
      what the earlier stages did for task j before it was trained (GEM uses a random model for b; here the base)
- FWT (single-task, the convention of recent LLM papers such as DOC) = 1/(T-1) sum_{j>0} (R[j][j] - s_j)
      how well task j is learned after the others, against learning it alone
- forgetting f_j = max_{j <= l < T-1} R[l][j] - R[T-1][j] for j < T-1 (Chaudhry et al. 2018): the best score task j
  had after it was trained, minus its final score.
"""

from __future__ import annotations

import math
import statistics

from fnscale.errors import UsageError

CONVENTIONS = __doc__


def _check(R: list[list[float]]) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise UsageError(
            f"the continual-learning matrix must be square with at least one task; "
            f"got {T} rows of {[len(r) for r in R]}"
        )
    return T


def summary(R: list[list[float]], base: list[float] | None = None, single: list[float] | None = None) -> dict:
    """AA, BWT, both FWTs (None where T < 2 or the reference is missing) and forgetting per task."""
    T = _check(R)
    last = R[T - 1]
    out = {"T": T, "AA": sum(last) / T, "BWT": None, "FWT_base": None, "FWT_single": None, "forgetting": [None] * T}
    if T < 2:
        return out
    out["BWT"] = sum(last[j] - R[j][j] for j in range(T - 1)) / (T - 1)
    if base is not None and all(x is not None for x in base):
        out["FWT_base"] = sum(R[j - 1][j] - base[j] for j in range(1, T)) / (T - 1)
    if single is not None and all(x is not None for x in single[1:]):
        out["FWT_single"] = sum(R[j][j] - single[j] for j in range(1, T)) / (T - 1)
    out["forgetting"] = [max(R[l][j] for l in range(j, T - 1)) - last[j] for j in range(T - 1)] + [None]
    return out


def spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation and count of the values that exist (sd None below two)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """a - b over the seeds both have: mean difference and its t interval; `shown` only when the interval excludes 0."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    out = {
        "seeds": seeds,
        "diffs": d,
        "mean": statistics.fmean(d) if d else None,
        "low": None,
        "high": None,
        "shown": False,
    }
    if len(d) > 1:
        half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        out["low"], out["high"] = out["mean"] - float(half), out["mean"] + float(half)
        out["shown"] = bool(out["low"] > 0 or out["high"] < 0)
    return out
