"""The continual-learning report: R per arm, seed and order, AA/BWT/FWT/forgetting, spread over seeds, pairs.

cl.json holds every figure; cl.md the tables; figures/ a heatmap of R and each task's score over the stages per run.
Cells of R are points (0-100) for accuracy metrics and minus the task loss for `loss` tasks (see metrics.CONVENTIONS).
"""

from __future__ import annotations

import re
from pathlib import Path

from fnscale.continual import metrics
from fnscale.runtime.atomic import atomic_path, finite, write_json, write_text

ACCURACY = ("exact_match", "label_accuracy", "token_accuracy")
FIELDS = ("AA", "BWT", "FWT_base", "FWT_single")


def label_accuracy(samples: list[dict]) -> float | None:
    """Share of generations whose first line starts with the label word (case-insensitive, punctuation ignored)."""
    if not samples:
        return None
    hits = 0
    for s in samples:
        ref = s["reference"].strip().lower()
        gen = (s["generation"].strip().splitlines() or [""])[0].strip().lower().lstrip("\"'*:- ")
        hits += bool(ref) and gen.startswith(ref) and (len(gen) == len(ref) or not gen[len(ref)].isalnum())
    return hits / len(samples)


def cell(scores: dict, metric: str) -> float | None:
    """One task's figure as R holds it: points for accuracies, minus the loss for `loss`."""
    if metric == "loss":
        return -scores["loss"]
    v = scores.get(metric)
    return None if v is None else 100 * v


def run_entry(seq, job, stages: list[dict | None], base: dict | None, singles: dict) -> dict | None:
    """R, the references and the summary of one finished sequence job (None while a stage is missing)."""
    if any(s is None for s in stages):
        return None
    tasks = job.order
    metric = {t: seq.tasks[t].metric for t in tasks}
    R = [[cell(s["scores"][t], metric[t]) for t in tasks] for s in stages]
    b = [cell(base["scores"][t], metric[t]) for t in tasks] if base else None
    ref = seq.reference_of(job.arm)
    single = [singles.get((ref, t, job.seed)) for t in tasks]
    s = [cell(x["scores"][t], metric[t]) if x else None for x, t in zip(single, tasks)]
    frozen = [st.get("frozen_share") for st in stages]
    return {
        "job": job.job_id,
        "arm": job.arm.name,
        "seed": job.seed,
        "order": job.order_index + 1,
        "tasks": tasks,
        "metrics": [metric[t] for t in tasks],
        "R": R,
        "base": b,
        "single": s,
        "frozen_share": frozen,
        **metrics.summary(R, b, s if all(x is not None for x in s[1:]) else None),
    }


def summarise(seq, runs: list[dict]) -> dict:
    """Per arm: per seed the mean over orders, then mean and sd over seeds; per arm and order, the same over seeds."""
    arms = {}
    for arm in seq.arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        per_seed = {
            f: {s: _mean([r[f] for r in mine if r["seed"] == s]) for s in sorted({r["seed"] for r in mine})}
            for f in FIELDS
        }
        arms[arm.name] = {
            "runs": len(mine),
            "seeds": sorted({r["seed"] for r in mine}),
            "per_seed": per_seed,
            **{f: metrics.spread(list(per_seed[f].values())) for f in FIELDS},
            "orders": {
                o: {f: metrics.spread([r[f] for r in mine if r["order"] == o]) for f in FIELDS}
                for o in sorted({r["order"] for r in mine})
            },
        }
    return arms


def comparisons(seq, arms: dict) -> list[dict]:
    """Paired by seed: each `compare` pair (default: every arm against the first), for AA and BWT."""
    names = [a.name for a in seq.arms]
    pairs = seq.compare or [(n, names[0]) for n in names[1:]]
    return [
        {"a": a, "b": b, **{f: metrics.paired(arms[a]["per_seed"][f], arms[b]["per_seed"][f]) for f in ("AA", "BWT")}}
        for a, b in pairs
    ]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def build(seq, base: dict | None, done: dict) -> dict:
    singles = {(j.reference, j.order[0], j.seed): done[j.job_id][0] for j in seq.jobs if j.kind == "single"}
    runs, missing = [], []
    for job in (j for j in seq.jobs if j.kind == "sequence"):
        entry = run_entry(seq, job, done[job.job_id], base, singles)
        (runs.append(entry) if entry else missing.append(job.job_id))
    missing += [j.job_id for j in seq.jobs if j.kind == "single" and done[j.job_id][0] is None]
    arms = summarise(seq, runs)
    return {
        "format": "fnscale-cl/1",
        "sequence": str(seq.path),
        "tasks": {n: vars(t) for n, t in seq.tasks.items()},
        "orders": seq.orders,
        "seeds": seq.seeds,
        "arms": arms,
        "comparisons": comparisons(seq, arms) if runs else [],
        "runs": runs,
        "missing": missing,
        "base": base["scores"] if base else None,
        "conventions": metrics.CONVENTIONS,
    }


def write_all(seq, base: dict | None, done: dict, out: Path) -> dict:
    rep = build(seq, base, done)
    files = {"json": out / "cl.json", "markdown": out / "cl.md"}
    for r in rep["runs"]:
        r["figures"] = plots(r, out / "figures")
    rep["figures"] = {"arms": str(arms_plot(rep["arms"], out / "figures" / "arms.png"))} if rep["runs"] else {}
    write_json(files["json"], finite({**rep, "files": {k: str(v) for k, v in files.items()}}))
    write_text(files["markdown"], markdown(rep))
    rep["files"] = {k: str(v) for k, v in files.items()}
    return rep


# ---------------------------------------------------------------- Markdown and figures


def _f(x, signed: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def _ms(s: dict, signed: bool = True) -> str:
    if s["mean"] is None:
        return "n/a"
    return _f(s["mean"], signed) + (f" ± {s['sd']:.2f}" if s["sd"] is not None else "")


def markdown(rep: dict) -> str:
    md = [
        f"# Continual learning: {rep['sequence']}\n",
        "Cells of R: points (0-100) for accuracy metrics, minus the task loss for `loss` tasks; higher is better "
        "everywhere. AA: mean of the last row. BWT: final minus just-trained score, mean over earlier tasks "
        "(negative = forgetting). FWT (base): score before training minus the base model's (Lopez-Paz & Ranzato). "
        "FWT (single): score just after training minus a single-task run's from the base (DOC's convention). "
        "Mean ± sd over seeds (each seed averaged over orders).\n",
        "Tasks: " + ", ".join(f"`{n}` ({t['metric']})" for n, t in rep["tasks"].items()) + "\n",
        "\n## Arms\n",
        "| arm | runs | seeds | AA | BWT | FWT (base) | FWT (single) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, a in rep["arms"].items():
        md.append(
            f"| {name} | {a['runs']} | {','.join(map(str, a['seeds']))} | {_ms(a['AA'], False)} | {_ms(a['BWT'])} | "
            f"{_ms(a['FWT_base'])} | {_ms(a['FWT_single'])} |"
        )
    if rep.get("figures"):
        md.append(f"\n![AA and BWT per arm](figures/{Path(rep['figures']['arms']).name})")
    if rep["comparisons"]:
        md += [
            "\n## Paired by seed (a - b, 95% t interval; inside it: not shown)\n",
            "| a | b | seeds | ΔAA | ΔBWT |",
            "|---|---|---:|---|---|",
        ]
        for c in rep["comparisons"]:
            md.append(f"| {c['a']} | {c['b']} | {len(c['AA']['diffs'])} | {_paired(c['AA'])} | {_paired(c['BWT'])} |")
    md.append("\n## Runs\n")
    for r in rep["runs"]:
        md.append(f"### {r['job']}\n")
        md.append(
            f"AA {_f(r['AA'])}, BWT {_f(r['BWT'], True)}, FWT (base) {_f(r['FWT_base'], True)}, "
            f"FWT (single) {_f(r['FWT_single'], True)}\n"
        )
        md += ["| after stage | " + " | ".join(r["tasks"]) + " |", "|---|" + "---:|" * len(r["tasks"])]
        md.append("| base | " + " | ".join(_f(x) for x in (r["base"] or [None] * len(r["tasks"]))) + " |")
        md += [f"| {k + 1}: {r['tasks'][k]} | " + " | ".join(_f(x) for x in row) + " |" for k, row in enumerate(r["R"])]
        md.append("| single-task | " + " | ".join(_f(x) for x in r["single"]) + " |")
        md.append("| forgetting | " + " | ".join(_f(x) for x in r["forgetting"]) + " |\n")
        if any(x is not None for x in r["frozen_share"]):
            md.append(
                "Frozen share after each stage: "
                + ", ".join("-" if x is None else f"{100 * x:.1f}%" for x in r["frozen_share"])
                + "\n"
            )
        md.append(
            " ".join(f"![{k}]({Path(v).parent.name}/{Path(v).name})" for k, v in r.get("figures", {}).items()) + "\n"
        )
    if rep["missing"]:
        md.append(f"\n## Not finished ({len(rep['missing'])})\n\n" + ", ".join(rep["missing"]) + "\n")
    return "\n".join(md) + "\n"


def _paired(p: dict) -> str:
    if p["mean"] is None:
        return "n/a"
    if p["low"] is None:
        return f"{p['mean']:+.2f}"
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]" + ("" if p["shown"] else " not shown")


def plots(r: dict, folder: Path) -> dict[str, str]:
    """R as a heatmap and each task's score over the stages (a line per task, the base as stage 0)."""
    from matplotlib.figure import Figure

    stem = re.sub(r"[^\w.-]+", "_", r["job"])
    paths = {"heatmap": folder / f"{stem}-R.png", "curves": folder / f"{stem}-curves.png"}
    T = len(r["tasks"])
    fig = Figure(figsize=(1.2 * T + 2.5, 1.0 * T + 1.5))
    ax = fig.subplots()
    im = ax.imshow(r["R"], cmap="viridis", aspect="auto")
    for i in range(T):
        for j in range(T):
            ax.text(j, i, _f(r["R"][i][j]), ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(T), r["tasks"], rotation=30, ha="right")
    ax.set_yticks(range(T), [f"after {k + 1}" for k in range(T)])
    ax.set_title(f"R: {r['job']}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, paths["heatmap"])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for j, t in enumerate(r["tasks"]):
        ys = [(r["base"] or [None] * T)[j]] + [row[j] for row in r["R"]]
        ax.plot(
            range(T + 1), [float("nan") if y is None else y for y in ys], marker="o", label=f"{t} ({r['metrics'][j]})"
        )
    ax.set_xticks(range(T + 1), ["base"] + [f"{k + 1}: {t}" for k, t in enumerate(r["tasks"])], rotation=20, ha="right")
    ax.set_ylabel("score (points, or -loss)")
    ax.set_title(f"each task over the stages: {r['job']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, paths["curves"])
    return {k: str(v) for k, v in paths.items()}


def arms_plot(arms: dict, path: Path) -> Path:
    """AA and BWT per arm: the mean over seeds as a bar, each seed as a dot (how far apart the seeds are)."""
    from matplotlib.figure import Figure

    names = [n for n, a in arms.items() if a["runs"]]
    fig = Figure(figsize=(1.1 * len(names) + 3, 3.6))
    for ax, f in zip(fig.subplots(1, 2), ("AA", "BWT")):
        for i, n in enumerate(names):
            seeds = [v for v in arms[n]["per_seed"][f].values() if v is not None]
            if seeds:
                ax.bar(i, arms[n][f]["mean"], color="C0" if f == "AA" else "C3", alpha=0.5)
                ax.plot([i] * len(seeds), seeds, "k.", ms=5)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f, fontsize=9)
    fig.suptitle("bar: mean over seeds; dot: one seed", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
