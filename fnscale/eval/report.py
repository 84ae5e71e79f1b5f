"""The forgetting report: deltas vs the base model, continual-learning metrics, and the files a person reads.

Writes report.json (every figure, deltas, the config), report.md (tables), task_vs_retention.png and
TensorBoard scalars (one run folder per model, step = model order), each written atomically.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from fnscale.errors import UsageError
from fnscale.eval.scoring import CL_CONVENTION, RETENTION_METRIC, cl_metrics
from fnscale.runtime.atomic import atomic_dir, atomic_path, finite, write_json, write_text

PLOT = "task_vs_retention.png"
GEN_METRICS = ("exact_match", "token_accuracy")


def _diff(a, b):
    return None if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) else a - b


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def deltas(base: dict, m: dict) -> dict:
    """Model minus base for every figure; summary: task gain = base loss - loss, retention cost = loss - base loss."""
    task = {
        name: {k: _diff(s[k], base["task"][name][k]) for k in ("loss", "ppl", *GEN_METRICS)}
        for name, s in m["task"].items()
    }
    retention = {}
    for name, s in m["retention"].items():
        b = base["retention"][name]
        pct = (
            100 * (s["ppl"] / b["ppl"] - 1)
            if math.isfinite(s["ppl"]) and math.isfinite(b["ppl"]) and b["ppl"] > 0
            else None
        )
        retention[name] = {"loss": _diff(s["loss"], b["loss"]), "ppl": _diff(s["ppl"], b["ppl"]), "ppl_pct": pct}
    summary = {
        "task_gain": _mean([-d["loss"] if d["loss"] is not None else None for d in task.values()]),
        "retention_cost": _mean([d["loss"] for d in retention.values()]),
    }
    out = {"task": task, "retention": retention, "summary": summary}
    if "lm_eval" in m and "lm_eval" in base:
        out["lm_eval"] = {
            t: {k: _diff(v, base["lm_eval"].get(t, {}).get(k)) for k, v in ms.items()} for t, ms in m["lm_eval"].items()
        }
    return out


def continual(results: list[dict], task_names: list[str], metric: str) -> dict:
    """R (rows: checkpoints in training order; columns: tasks), the base row b, and ACC/BWT/FWT."""

    def score(r, t):
        v = r["task"][t][metric]
        if v is None:
            raise UsageError(f"task {t} has no prompts to generate from, so --cl-metric {metric} is undefined for it")
        return v

    R = [[score(r, t) for t in task_names] for r in results[1:]]
    b = [score(results[0], t) for t in task_names]
    if len(R) != len(task_names):
        raise UsageError(
            f"the sequence has {len(R)} checkpoints for {len(task_names)} tasks; give one checkpoint per task"
        )
    rows = [r["label"] for r in results[1:]]
    return {
        "metric": metric,
        "tasks": task_names,
        "rows": rows,
        "R": R,
        "baseline": b,
        **cl_metrics(R, b),
        "convention": CL_CONVENTION,
    }


def build(meta: dict, results: list[dict], cl_metric: str | None = None) -> dict:
    base = results[0]
    rep = {"format": "fnscale-eval/1", **meta, "base": base["label"], "models": results}
    rep["deltas"] = {m["label"]: deltas(base, m) for m in results[1:]}
    if cl_metric:
        rep["continual"] = continual(results, [t["name"] for t in meta["tasks"]], cl_metric)
    return rep


def write_all(rep: dict, out: Path) -> dict[str, str]:
    out = Path(out)
    files = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "plot": out / PLOT,
        "tensorboard": out / "tensorboard",
    }
    write_json(files["json"], finite({**rep, "files": {k: str(v) for k, v in files.items()}}))
    write_text(files["markdown"], markdown(rep))
    plot(rep, files["plot"])
    tensorboard(rep, files["tensorboard"])
    return {k: str(v) for k, v in files.items()}


# ---------------------------------------------------------------- Markdown


def _f(x, fmt="{:.4f}", signed=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None else str(x)
    return ("{:+" + fmt[2:]).format(x) if signed else fmt.format(x)


def _pct(x, signed=False):
    return "n/a" if x is None else (f"{100 * x:+.1f} pp" if signed else f"{100 * x:.1f}%")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def markdown(rep: dict) -> str:
    models, model_deltas = rep["models"], rep["deltas"]
    cfg = rep["config"]
    md = [f"# Forgetting report: {rep['model']}\n"]
    md.append(
        f"Device {rep['device']}, {rep['dtype']}, seed {cfg['seed']}, max {cfg['max_seq_length']} tokens per "
        "sequence.\n"
    )
    md.append(
        "Models: "
        + ", ".join(f"`{m['label']}` ({m['kind']}{', ' + m['path'] if m['path'] else ''})" for m in models)
        + "\n"
    )
    for t in rep["tasks"]:
        md.append(
            f"Task `{t['name']}`: {t['source']} — split `{t['split']}`, {t['examples']} examples scored for loss, "
            f"{t['generated']} generated.\n"
        )
    for r in rep["retention"]:
        md.append(f"Retention `{r['name']}`: {r['source']} — {r['chunks']} windows; scored: {r['scored']}.\n")

    md.append("\n## What fine-tuning gained (task)\n")
    for t in rep["tasks"]:
        rows = []
        for m in models:
            s, d = m["task"][t["name"]], model_deltas.get(m["label"], {}).get("task", {}).get(t["name"], {})
            rows.append(
                [
                    m["label"],
                    _f(s["loss"]),
                    _f(d.get("loss"), signed=True) if d else "",
                    _f(s["ppl"], "{:.2f}"),
                    _pct(s["exact_match"]),
                    _pct(d.get("exact_match"), True) if d else "",
                    _pct(s["token_accuracy"]),
                    _pct(d.get("token_accuracy"), True) if d else "",
                    str(s["tokens"]),
                ]
            )
        if len(rep["tasks"]) > 1:
            md.append(f"\n### {t['name']}\n")
        md.append(
            _table(
                ["model", "loss", "Δ loss", "ppl", "exact match", "Δ EM", "token acc", "Δ token acc", "tokens"], rows
            )
        )

    if rep["retention"]:
        md.append("\n## What it cost (retention)\n")
        rows = []
        for r in rep["retention"]:
            for m in models:
                s, d = m["retention"][r["name"]], model_deltas.get(m["label"], {}).get("retention", {}).get(r["name"])
                rows.append(
                    [
                        m["label"],
                        r["name"],
                        _f(s["loss"]),
                        _f(d["loss"], signed=True) if d else "",
                        _f(s["ppl"], "{:.2f}"),
                        (_f(d["ppl_pct"], "{:.1f}", signed=True) + "%") if d and d["ppl_pct"] is not None else "",
                        str(s["tokens"]),
                    ]
                )
        md.append(_table(["model", "corpus", "loss", "Δ loss", "ppl", "Δ ppl", "tokens"], rows))

    if model_deltas:
        md.append("\n## Gain vs cost\n")
        md.append(
            _table(
                ["model", "task gain (nats/token)", "retention cost (nats/token)"],
                [
                    [k, _f(v["summary"]["task_gain"], signed=True), _f(v["summary"]["retention_cost"], signed=True)]
                    for k, v in model_deltas.items()
                ],
            )
        )
        md.append(f"\n![task gain vs retention cost]({PLOT})\n")

    if any("lm_eval" in m for m in models):
        md.append("\n## lm-eval harness\n")
        rows = [
            [m["label"], t, k, _f(v)]
            for m in models
            for t, ms in m.get("lm_eval", {}).items()
            for k, v in sorted(ms.items())
        ]
        md.append(_table(["model", "task", "metric", "value"], rows))

    if "continual" in rep:
        c = rep["continual"]
        md.append(f"\n## Continual learning ({c['metric']})\n")
        head = ["after training on", *c["tasks"]]
        rows = [["base (b)", *[_f(x) for x in c["baseline"]]]]
        rows += [[f"{i + 1}. {lab}", *[_f(x) for x in row]] for i, (lab, row) in enumerate(zip(c["rows"], c["R"]))]
        md.append(_table(head, rows))
        md.append(
            f"\nACC = {_f(c['ACC'])}, BWT = {_f(c['BWT'], signed=True)}, FWT = {_f(c['FWT'], signed=True)} (T = "
            f"{c['T']}).\n"
        )
        md.append(f"\n{c['convention']}\n")

    md.append(_samples(rep))
    md.append("\n## How the figures are computed\n")
    md.append(
        "- **loss**: mean next-token negative log-likelihood (nats) over scored tokens; **ppl** = exp(loss). Task data "
        "scores the "
        "response tokens and EOS (prompt masked, as in training). Retention data scores every token it holds, in "
        f"non-overlapping windows (metric `{RETENTION_METRIC}`): plain text on its own tokens, with a BOS where the "
        "tokenizer adds one but no EOS or end-of-turn token and no chat template (a chat model's loss on an "
        "end-of-turn token after prose would mask forgetting); SFT data in its training rendering, every token.\n"
        "- **exact match**: greedy generation equals the reference after whitespace normalisation (case-sensitive).\n"
        "- **token accuracy**: share of reference tokens (response + EOS) the greedy generation matches position by "
        "position.\n"
        "- **Δ** = model − base: lower loss and higher accuracy are better; a positive retention Δ loss is "
        "forgetting.\n"
        "- **task gain** = base task loss − model task loss; **retention cost** = model retention loss − base "
        "retention loss (means over tasks/corpora).\n"
    )
    if rep.get("notes"):
        md.append("\n## Notes\n" + "".join(f"- {n}\n" for n in rep["notes"]))
    return "\n".join(md)


def summary_table(rep: dict) -> str:
    """The compact table `fnscale eval` prints when it ends: task loss (Δ vs base) and exact match per task,
    retention perplexity (Δ in percent) per corpus, one row per model."""
    head = ["model"]
    for t in rep["tasks"]:
        head += [f"{t['name']} loss", "Δ", "EM"]
    for r in rep["retention"]:
        head += [f"{r['name']} ppl", "Δ"]
    rows = []
    for m in rep["models"]:
        d, row = rep["deltas"].get(m["label"], {}), [m["label"]]
        for t in rep["tasks"]:
            s, dt = m["task"][t["name"]], d.get("task", {}).get(t["name"])
            row += [_f(s["loss"]), _f(dt["loss"], signed=True) if dt else "", _pct(s["exact_match"])]
        for r in rep["retention"]:
            s, dr = m["retention"][r["name"]], d.get("retention", {}).get(r["name"])
            pct = dr["ppl_pct"] if dr else None
            row += [_f(s["ppl"], "{:.2f}"), _f(pct, "{:.1f}", signed=True) + "%" if pct is not None else ""]
        rows.append(row)
    return _table(head, rows)


def _samples(rep: dict, n: int = 3) -> str:
    out = []
    for t in rep["tasks"]:
        per_model = [(m["label"], m["task"][t["name"]]["samples"]) for m in rep["models"]]
        count = min([len(s) for _, s in per_model] + [n])
        for i in range(count):
            ref = per_model[0][1][i]
            out.append(
                f"\n**{t['name']} #{i + 1}** — prompt: {_one_line(ref['prompt'], tail=True)}\n\n- reference: "
                f"{_one_line(ref['reference'])}\n"
            )
            out.extend(f"- {label}: {_one_line(s[i]['generation'])}\n" for label, s in per_model)
    return ("\n## Sample generations\n" + "".join(out)) if out else ""


def _one_line(text: str, limit: int = 160, tail: bool = False) -> str:
    """One line for Markdown; prompts keep their end (the question), since chat templates open with boilerplate."""
    text = " ".join(text.split()).replace("`", "'")
    if len(text) > limit:
        text = "…" + text[-limit:] if tail else text[:limit] + "…"
    return f"`{text}`" if text else "(empty)"


# ---------------------------------------------------------------- plot and TensorBoard


def plot(rep: dict, target: Path) -> None:
    """Task gain (y) against retention cost (x): up-left is good, down-right is forgetting without gain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [("base", 0.0, 0.0)] + [
        (k, v["summary"]["retention_cost"] or 0.0, v["summary"]["task_gain"] or 0.0) for k, v in rep["deltas"].items()
    ]
    for label, x, y in points:
        ax.scatter([x], [y], s=40, color="grey" if label == "base" else None)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel("retention cost: Δ loss on retention data (nats/token)")
    ax.set_ylabel("task gain: base − model task loss (nats/token)")
    ax.set_title(f"Task gain vs retention cost — {rep['model']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _run_name(i: int, label: str) -> str:
    return f"{i:02d}_" + re.sub(r"[^\w.-]+", "_", label)


def tensorboard(rep: dict, target: Path) -> None:
    """One run per model (step = its order: base 0, then each checkpoint), so curves follow a training sequence."""
    from torch.utils.tensorboard import SummaryWriter

    with atomic_dir(target) as tmp:
        for i, m in enumerate(rep["models"]):
            scalars = {}
            for t, s in m["task"].items():
                scalars.update({f"task/{t}/{k}": s[k] for k in ("loss", "ppl", *GEN_METRICS)})
            for c, s in m["retention"].items():
                scalars.update({f"retention/{c}/loss": s["loss"], f"retention/{c}/ppl": s["ppl"]})
            for t, ms in m.get("lm_eval", {}).items():
                scalars.update({f"lm_eval/{t}/{k}": v for k, v in ms.items()})
            for k, v in rep["deltas"].get(m["label"], {}).get("summary", {}).items():
                scalars[f"summary/{k}"] = v
            writer = SummaryWriter(str(tmp / _run_name(i, m["label"])))
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, i)
            writer.close()
        if "continual" in rep:
            writer = SummaryWriter(str(tmp / "continual"))
            for k in ("ACC", "BWT", "FWT"):
                if rep["continual"][k] is not None:
                    writer.add_scalar(f"continual/{k}", rep["continual"][k], 0)
            writer.close()
