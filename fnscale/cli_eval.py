"""`fnscale eval`: one command that scores the base model and its fine-tuned variants (see fnscale.evaluate).

It replaces the placeholder `eval` group that cli.py declares, so `fnscale eval --model ... --task ...`
runs directly; options come from `EvalConfig`, declared once with their defaults.
"""

from __future__ import annotations

import click

from fnscale.evaluate import EvalConfig


def _build_command(options_from, context, explicit_params):
    @click.command(name="eval", context_settings=context)
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML file of options; flags given here override it")
    @options_from(EvalConfig)
    @click.pass_context
    def eval_cmd(ctx, config_file, **values):
        """Measure what fine-tuning gained on the task and what it cost on retention data.

        Scores the base model and each --adapter / --finetuned model (or a --sequence of checkpoints)
        and writes report.json, report.md, task_vs_retention.png and TensorBoard scalars to --output.
        """
        from fnscale.config import load_yaml, merge
        from fnscale.evaluate import run_eval

        yaml_values = load_yaml(config_file) if config_file else {}
        cfg = merge(EvalConfig, yaml_values, values, explicit_params(ctx))
        rep = run_eval(cfg)
        _echo_summary(rep)

    eval_cmd.fnscale_eval = True
    return eval_cmd


def _echo_summary(rep: dict) -> None:
    for m in rep["models"]:
        task = "  ".join(f"{t} loss {s['loss']:.4f}" for t, s in m["task"].items())
        ret = "  ".join(f"{c} ppl {s['ppl']:.2f}" for c, s in m["retention"].items())
        click.echo(f"{m['label']:24s} {task}  {ret}")
    if "continual" in rep:
        c = rep["continual"]
        fmt = lambda x: "n/a" if x is None else f"{x:+.4f}"  # noqa: E731
        click.echo(f"continual ({c['metric']}): ACC {c['ACC']:.4f}  BWT {fmt(c['BWT'])}  FWT {fmt(c['FWT'])}")
    click.echo(f"report: {rep['files']['markdown']}")


def register(group, root) -> None:
    """Install `eval` as a command on the root group, in place of the placeholder group (idempotent)."""
    if getattr(root.commands.get("eval"), "fnscale_eval", False):
        return
    from fnscale.cli import CONTEXT, explicit_params, options_from

    root.commands.pop("eval", None)
    root.add_command(_build_command(options_from, CONTEXT, explicit_params), name="eval")
