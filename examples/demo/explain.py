"""Print what `make demo` found: the table (task gain, retention cost per run), a plain reading of it, and the files.

    python examples/demo/explain.py runs/demo

Reads only the sweep's own outputs (sweep.json, networks/done.json, each run's metrics.jsonl); every figure printed
comes from them, and the wording follows the figures, whatever they are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCE = "full-ft"
NETWORKS = "lesion-update"
CONTROL = "lesion-update-random"


def _masked(out: Path, run_id: str) -> tuple[int, float] | None:
    """(masked neurons, their share of the MLP neurons) as the run logged them when its masks went on."""
    path = out / "runs" / run_id / "train" / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "masked_neurons/total" in rec:
            return rec["masked_neurons/total"], rec["masked_neurons/share_of_masked_layers"]
    return None


def table(rep: dict) -> list[str]:
    base = rep["base"]
    task = next(iter(base["task_loss"]))
    corpus = next(iter(base["retention_ppl"]))
    lines = [
        "| run | task loss | retention ppl | task gain | retention cost |",
        "|---|---:|---:|---:|---:|",
        f"| base model | {base['task_loss'][task]:.3f} | {base['retention_ppl'][corpus]:.2f} | 0 | 0 |",
    ]
    for r in rep["runs"]:
        lines.append(
            f"| {r['name']} | {r['task_loss']:.3f} | {r['retention_ppl'][corpus]:.2f} | {r['task_gain']:+.3f} "
            f"| {r['retention_cost_pct']:+.1f}% |"
        )
    return lines


def _gain_vs(x: float, ref: float) -> str:
    return f"{100 * x / ref:.0f}% of {REFERENCE}'s" if ref > 0 else f"{x - ref:+.3f} vs {REFERENCE}"


def _cost_vs(x: float, ref: float) -> str:
    if ref <= 0:
        return f"{x - ref:+.1f} points vs {REFERENCE}"
    if x <= 0:
        return f"retention no worse than the base, where {REFERENCE}'s rose {ref:+.1f}%"
    return f"{100 * x / ref:.0f}% of {REFERENCE}'s rise"


def reading(rep: dict, out: Path) -> list[str]:
    runs = {r["name"]: r for r in rep["runs"]}
    ref = runs.get(REFERENCE)
    seeds = sorted({r["seed"] for r in rep["runs"]})
    lines = [
        f"Reading ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
        + (
            "an anecdote, not evidence: differences between runs here are as likely seed noise as effects)"
            if len(seeds) == 1
            else "see sweep.md for the spread over seeds)"
        )
    ]
    if ref is None:
        return lines
    gain, cost = ref["task_gain"], ref["retention_cost_pct"]
    lines.append(
        f"- {REFERENCE} (every weight trains): task gain {gain:+.3f}, retention cost {cost:+.1f}%"
        + ("" if cost > 0 else ": it did not forget in this short run, so there was nothing for the masks to protect")
        + "."
    )
    for name, what in (
        (NETWORKS, "the networks' neurons frozen"),
        (CONTROL, "as many random neurons per layer frozen"),
    ):
        r = runs.get(name)
        if r is None:
            continue
        masked = _masked(out, r["run"])
        size = f", {masked[0]:,} neurons = {100 * masked[1]:.1f}% of the MLP neurons" if masked else ""
        lines.append(
            f"- {name} ({what}{size}): gain {r['task_gain']:+.3f} ({_gain_vs(r['task_gain'], gain)}), "
            f"cost {r['retention_cost_pct']:+.1f}% ({_cost_vs(r['retention_cost_pct'], cost)})."
        )
    net, ctl = runs.get(NETWORKS), runs.get(CONTROL)
    if net and ctl:
        diff = net["retention_cost_pct"] - ctl["retention_cost_pct"]
        side = "less" if diff < 0 else "more"
        lines.append(
            f"- Networks vs random control: freezing the networks cost {abs(diff):.1f} points {side} retention than "
            f"freezing random neurons (task gain {net['task_gain'] - ctl['task_gain']:+.3f}). Only a difference that "
            "holds over several seeds means something: set `seeds: [1, 2, 3]` in examples/demo/sweep.yaml and run "
            "`make demo` again (finished runs are kept)."
        )
    lines.append(
        "- Not run here: the baselines a mask must beat, a lower learning rate and LoRA; docs/experiments.md compares "
        "them all over 3 seeds on the same data."
    )
    return lines


def main(out: str) -> None:
    out = Path(out)
    rep = json.loads((out / "sweep.json").read_text())
    nets = (
        json.loads((out / "networks" / "done.json").read_text())["files"]
        if (out / "networks" / "done.json").is_file()
        else {}
    )
    print(
        "\nfnscale demo: task gain = base task loss - run task loss (higher is better); retention cost = rise of the "
        "retention perplexity vs the base (lower is better).\n"
    )
    print("\n".join(table(rep)))
    print()
    print("\n".join(reading(rep, out)))
    print("\nFiles:")
    models = str(out.absolute() / "runs" / "*" / "train" / "final") + "  (each with its model card, README.md)"
    files = [
        ("networks", nets.get("path")),
        ("heatmap", nets.get("heatmap")),
        ("table", rep["files"]["markdown"]),
        ("Pareto plot", rep["files"]["plot"]),
        ("models", models),
    ]
    for label, path in files:
        if path:
            print(f"  {label:12s} {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/demo/explain.py SWEEP_OUTPUT_FOLDER")
    main(sys.argv[1])
