"""The sweep's report: per-run deltas vs the base, mean and spread per configuration, and the Pareto front.

Task gain = base task loss - run task loss (higher is better); retention cost = relative rise of the
retention perplexity in percent, averaged over retention corpora (lower is better). A configuration is
Pareto-optimal when no other has at least its gain and at most its cost, one of them strictly. The sweep file's
`compare` pairs get their differences paired by seed with a 95% Student t interval (fnscale.eval.stats).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from fnscale.eval.stats import METHOD, paired_difference
from fnscale.runtime.atomic import atomic_path, finite, write_json, write_text

PLOT = "pareto.png"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (gain, cost) points: True where no other point has gain >= and cost <= with one strictly better.

    Points with a missing or non-finite coordinate are never on the front (and dominate nothing).
    """
    ok = [p is not None and all(x is not None and math.isfinite(x) for x in p) for p in points]
    front = []
    for i, (g, c) in enumerate(points):
        dominated = (
            any(
                ok[j] and j != i and points[j][0] >= g and points[j][1] <= c and (points[j][0] > g or points[j][1] < c)
                for j in range(len(points))
            )
            if ok[i]
            else True
        )
        front.append(not dominated)
    return front


def run_row(done: dict, base: dict) -> dict:
    """One run's scores and its deltas vs the base model."""
    task_name = next(iter(base["task_loss"]))
    task_loss = done["task_loss"][task_name]
    rises = [
        100 * (done["retention_ppl"][n] / b - 1)
        for n, b in base["retention_ppl"].items()
        if n in done["retention_ppl"] and b > 0
    ]
    return {
        "run": done["run"],
        "name": done["name"],
        "seed": done["seed"],
        "options": done["options"],
        "config": done.get("config", {}).get("train"),
        "train": done.get("train", {}),
        "task_loss": task_loss,
        "retention_ppl": done["retention_ppl"],
        "task_loss_delta": task_loss - base["task_loss"][task_name],
        "retention_ppl_delta": {
            n: done["retention_ppl"][n] - b for n, b in base["retention_ppl"].items() if n in done["retention_ppl"]
        },
        "task_gain": base["task_loss"][task_name] - task_loss,
        "retention_cost_pct": sum(rises) / len(rises) if rises else None,
    }


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None}


def summarise(rows: list[dict], order: list[str], corpora: list[str], reference: str | None) -> list[dict]:
    """Mean and sample standard deviation over seeds per configuration, the Pareto flag and shares of the reference."""
    configs = []
    for name in order:
        rs = [r for r in rows if r["name"] == name]
        if not rs:
            continue
        configs.append(
            {
                "name": name,
                "seeds": [r["seed"] for r in rs],
                "options": rs[0]["options"],
                "task_loss": _stats([r["task_loss"] for r in rs]),
                "retention_ppl": {c: _stats([r["retention_ppl"].get(c) for r in rs]) for c in corpora},
                "task_gain": _stats([r["task_gain"] for r in rs]),
                "retention_cost_pct": _stats([r["retention_cost_pct"] for r in rs]),
            }
        )
    front = pareto_front([(c["task_gain"]["mean"], c["retention_cost_pct"]["mean"]) for c in configs])
    ref = next((c for c in configs if c["name"] == reference), None)
    for c, on_front in zip(configs, front):
        c["pareto"] = on_front
        if ref is not None:
            c["gain_share_of_reference"] = _ratio(c["task_gain"]["mean"], ref["task_gain"]["mean"])
            c["cost_share_of_reference"] = _ratio(c["retention_cost_pct"]["mean"], ref["retention_cost_pct"]["mean"])
    return configs


def comparisons(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """For each pair (a, b): a - b in task gain and in retention cost, paired by seed (see fnscale.eval.stats)."""
    out = []
    for a, b in pairs:
        by_seed = {name: {r["seed"]: r for r in rows if r["name"] == name} for name in (a, b)}
        entry = {"a": a, "b": b, "method": METHOD}
        for metric in ("task_gain", "retention_cost_pct"):
            values = {name: {seed: r[metric] for seed, r in runs.items()} for name, runs in by_seed.items()}
            entry[metric] = paired_difference(values[a], values[b])
        out.append(entry)
    return out


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _fmt(s: dict, spec: str = ".3f") -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:{spec}}" + (f" ± {s['sd']:{spec.lstrip('+')}}" if s["sd"] is not None else "")


def markdown(rep: dict) -> str:
    base, corpora = rep["base"], list(rep["base"]["retention_ppl"])
    task_name = next(iter(base["task_loss"]))
    has_ref = rep.get("reference") is not None
    head = [
        "configuration",
        "seeds",
        "task loss",
        *[f"{c} ppl" for c in corpora],
        "task gain",
        "retention cost %",
        "Pareto",
    ]
    head += ["gain / ref", "cost / ref"] if has_ref else []
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    base_cells = [
        "base model",
        "-",
        f"{base['task_loss'][task_name]:.3f}",
        *[f"{base['retention_ppl'][c]:.2f}" for c in corpora],
        "0",
        "0",
        "",
    ]
    lines.append("| " + " | ".join(base_cells + (["", ""] if has_ref else [])) + " |")
    for c in rep["configs"]:
        cells = [
            c["name"],
            str(len(c["seeds"])),
            _fmt(c["task_loss"]),
            *[_fmt(c["retention_ppl"][k], ".2f") for k in corpora],
            _fmt(c["task_gain"]),
            _fmt(c["retention_cost_pct"], "+.1f"),
            "**yes**" if c["pareto"] else "",
        ]
        if has_ref:
            cells += [_share(c.get("gain_share_of_reference")), _share(c.get("cost_share_of_reference"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"# Sweep: {rep['sweep']}",
        "",
        (
            "Mean ± sample standard deviation over seeds. Task gain = base task loss - task loss (higher is better); "
            "retention cost = rise of retention perplexity vs the base, in percent (lower is better); retention "
            f"metric `{base.get('retention_metric', 'retention/1')}` (plain text scored on its own tokens, no EOS or "
            "end-of-turn token; SFT data as rendered for training). "
            "Pareto: no other configuration has at least its mean gain and at most its mean cost."
        ),
        "",
        *lines,
        "",
    ]
    if has_ref:
        notes += [f"gain / ref and cost / ref: shares of `{rep['reference']}`'s mean gain and mean cost.", ""]
    if rep.get("comparisons"):
        notes += comparison_table(rep["comparisons"])
    if rep["missing"]:
        notes += [f"Not finished ({len(rep['missing'])}): {', '.join(rep['missing'])}.", ""]
    return "\n".join(notes)


def comparison_table(comps: list[dict]) -> list[str]:
    """Markdown lines: the paired differences A - B, each with its 95% interval and whether it excludes 0."""
    lines = [
        "## Paired comparisons",
        "",
        (
            "A - B over the seeds both finished (runs of one seed share data order and initial state); 95% interval "
            "from "
            "Student's t with n-1 degrees of freedom. Task gain: higher is better, so a positive difference favours A; "
            "retention cost (percentage points): lower is better, so a negative difference favours A. "
            "Shown: the interval excludes 0; otherwise the difference is not shown, whatever its sign."
        ),
        "",
        "| A - B | seeds | task gain diff [95% CI] | shown | retention cost diff, points [95% CI] | shown |",
        "|---|---:|---:|---|---:|---|",
    ]
    for c in comps:
        g, k = c["task_gain"], c["retention_cost_pct"]
        lines.append(
            f"| {c['a']} - {c['b']} | {max(g['n'], k['n'])} | {_interval(g, '+.3f')} | {_shown(g)} | "
            f"{_interval(k, '+.2f')} | {_shown(k)} |"
        )
    return lines + [""]


def _interval(d: dict, spec: str) -> str:
    if d["mean"] is None:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:{spec}} (one seed: no interval)"
    return f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]"


def _shown(d: dict) -> str:
    return "n/a" if d["excludes_zero"] is None else "**yes**" if d["excludes_zero"] else "not shown"


def _share(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def front_line(configs: list[dict]) -> list[tuple[float, float]]:
    """The Pareto-optimal configurations' (mean cost, mean gain), by rising cost: the front the plot draws as a line."""
    return sorted((c["retention_cost_pct"]["mean"], c["task_gain"]["mean"]) for c in configs if c["pareto"])


def plot(rep: dict, target: Path) -> None:
    """Task gain vs retention cost: runs as dots, configuration means with spread, the Pareto front starred."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))  # no pyplot: the caller's backend and figures are left alone
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(rep["configs"]):
        color = colors[i % len(colors)]
        rs = [r for r in rep["runs"] if r["name"] == c["name"] and r["retention_cost_pct"] is not None]
        ax.scatter([r["retention_cost_pct"] for r in rs], [r["task_gain"] for r in rs], s=14, alpha=0.45, color=color)
        g, k = c["task_gain"], c["retention_cost_pct"]
        if g["mean"] is None or k["mean"] is None:
            continue
        ax.errorbar(
            k["mean"],
            g["mean"],
            xerr=k["sd"] or 0,
            yerr=g["sd"] or 0,
            fmt="*" if c["pareto"] else "o",
            markersize=14 if c["pareto"] else 7,
            color=color,
            capsize=3,
            label=c["name"] + (" (Pareto)" if c["pareto"] else ""),
        )
    front = front_line(rep["configs"])
    if len(front) > 1:
        ax.plot(*zip(*front), "-", color="gray", linewidth=1.2, zorder=0, label="Pareto front")
    ax.scatter([0], [0], marker="x", color="black", label="base model")
    ax.set_xlabel("retention cost: perplexity rise vs base (%)  [lower is better]")
    ax.set_ylabel("task gain: base loss - loss  [higher is better]")
    ax.set_title("fnscale sweep: task gain vs retention cost (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_all(sweep, base: dict, done: dict[str, dict | None], out: Path) -> dict:
    """sweep.json, sweep.md and pareto.png from the finished runs (unfinished ones are listed as missing)."""
    rows = [run_row(d, base) for d in done.values() if d is not None]
    rep = {
        "format": "fnscale-sweep/1",
        "sweep": str(sweep.path),
        "reference": sweep.reference,
        "base": base,
        "missing": [run_id for run_id, d in done.items() if d is None],
        "runs": rows,
        "configs": summarise(rows, [name for name, _ in sweep.configs], list(base["retention_ppl"]), sweep.reference),
        "comparisons": comparisons(rows, getattr(sweep, "compare", [])),
    }
    files = {"json": str(out / "sweep.json"), "markdown": str(out / "sweep.md"), "plot": str(out / PLOT)}
    rep["files"] = files
    write_json(files["json"], finite(rep))
    write_text(files["markdown"], markdown(rep))
    plot(rep, Path(files["plot"]))
    return rep
