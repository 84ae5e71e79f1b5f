"""Issue 14: clean exits, mistakes found before the model loads, no rank left waiting, exact validation loss
under N ranks, and Ctrl-C that checkpoints and exits 130."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers_dist import REPO, clean_env, launch_cmd, run, write_uniform_sft

from fnscale.config import TrainConfig
from fnscale.errors import RunError, UsageError
from fnscale.networks.templates import Templates
from fnscale.recipes import train as train_mod
from fnscale.runtime.distributed import exit_process, raise_if_any_failed, shutdown


def _model_must_not_load(cfg, accelerator):
    raise AssertionError("the model was loaded before the mask options were checked")


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpl")
    Templates(layers=[0, 1], neurons_per_layer=64, components={0: {0: [1]}, 1: {1: [3]}}).save(d / "ok.json")
    Templates(layers=[0], neurons_per_layer=64, components={0: {0: [1]}}, num_layers=2).save(d / "layer0.json")
    Templates(layers=[0, 1, 2], neurons_per_layer=64, components={0: {0: [1]}}).save(d / "deep.json")
    Templates(layers=[0, 1], neurons_per_layer=32, components={0: {0: [1]}}).save(d / "narrow.json")
    return d


@pytest.mark.parametrize(
    "options,message",
    [
        ({"ica_template_path": "ok.json"}, "--ica-component-ids"),
        ({"ica_template_path": "missing.json", "ica_component_ids": "0"}, "not found"),
        ({"ica_template_path": "ok.json", "ica_component_ids": "0,5"}, "component 5 is not in this template"),
        ({"ica_template_path": "layer0.json", "ica_component_ids": "0", "ica_layers": "1"}, "does not cover"),
        ({"ica_template_path": "deep.json", "ica_component_ids": "0"}, "model has 2 layers"),
        ({"ica_template_path": "narrow.json", "ica_component_ids": "0"}, "× 32 neurons"),
    ],
    ids=["no ids", "missing file", "unknown id", "layers outside", "layer count", "width"],
)
def test_mask_mistakes_are_refused_before_the_model_loads(tiny_llama, sft_file, templates, tmp_path, options, message):
    options = {**options, "ica_template_path": str(templates / options["ica_template_path"])}
    cfg = TrainConfig(
        model=tiny_llama, dataset=(sft_file,), output_dir=str(tmp_path), mask_mode="lesion", report_to="none", **options
    )
    with pytest.raises(UsageError, match=message):
        train_mod.train(cfg, build_model=_model_must_not_load)


def test_shutdown_destroys_the_process_group(tmp_path):
    import torch.distributed as dist

    shutdown()  # nothing initialised: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown()
    assert not dist.is_initialized()


def test_exit_process_returns_where_no_group_was_joined():
    """One process, or a mistake refused before the group: exit normally (the caller re-raises SystemExit). A
    joined group's exit (barrier, destroy, os._exit) is exercised by every multi-process launch in the slow tests."""
    assert exit_process(0) is None and exit_process(2) is None


def test_status_exchange_reraises_the_local_error_on_one_process():
    class One:
        num_processes, process_index = 1, 0

    raise_if_any_failed(One(), None, "saving")
    err = RunError("disk full")
    with pytest.raises(RunError) as caught:
        raise_if_any_failed(One(), err, "saving")
    assert caught.value is err


# ---------------------------------------------------------------- Ctrl-C


def _train_cmd(model, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "fnscale",
        "train",
        "--model",
        model,
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--no-lora",
        "--report-to",
        "none",
        "--validation-split",
        "0",
        "--max-seq-length",
        "64",
        "--batch-size",
        "2",
        "--save-steps",
        "0",
        "--eval-steps",
        "0",
        "--lr-scheduler",
        "constant",
        "--seed",
        "3",
        *extra,
    ]


def _logged_steps(out) -> list[int]:
    try:
        return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_and_exits_130_then_auto_resume_continues(tiny_llama, sft_file, tmp_path):
    out = tmp_path / "run"
    env = clean_env()
    proc = subprocess.Popen(
        _train_cmd(tiny_llama, sft_file, out, "--max-steps", "100000"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not _logged_steps(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert _logged_steps(out), "no training step was logged"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--resume-from-checkpoint auto" in errors[0] and "Traceback" not in stderr, stderr[
        -3000:
    ]
    stop = _logged_steps(out)[-1]
    assert f"interrupted at step {stop}" in errors[0]
    state = json.loads((out / f"checkpoint-{stop}" / "trainer_state.json").read_text())
    assert state["step"] == stop and not (out / "final").exists()

    res = subprocess.run(
        _train_cmd(tiny_llama, sft_file, out, "--max-steps", str(stop + 2), "--resume-from-checkpoint", "auto"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / f'checkpoint-{stop}'} at step {stop}" in res.stdout + res.stderr
    assert _logged_steps(out) == list(range(1, stop + 3))
    assert (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------- several processes


def _small_args(model, data, out, *extra, steps: int = 2):
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
        "--batch-size",
        "2",
        "--report-to",
        "none",
        "--seed",
        "7",
        *extra,
    ]


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return write_uniform_sft(tmp_path_factory.mktemp("rel_data") / "uniform.jsonl", 16)


@pytest.mark.slow
def test_validation_loss_on_two_ranks_equals_one_process(tiny_llama, data16, tmp_path):
    """7 validation samples of different lengths in batches of 2: even-batches padding would score one twice on 2 ranks.
    The learning rate is tiny so both runs evaluate the same weights (to ~1e-12)."""
    val = tmp_path / "val.jsonl"
    rows = [
        {
            "instruction": "what is the capital of " + " ".join(["zorvia"] * (1 + i)) + " ?",
            "output": "the capital is " + "paris " * (1 + 2 * i),
        }
        for i in range(7)
    ]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = (
        "--validation-dataset",
        str(val),
        "--no-lora",
        "--learning-rate",
        "1e-12",
        "--max-grad-norm",
        "0",
        "--warmup-ratio",
        "0",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    res = run([sys.executable, "-m", "fnscale", *_small_args(tiny_llama, data16, one, *extra, steps=1)])
    assert res.returncode == 0, res.stdout[-4000:]
    res = run(launch_cmd("cpu_2proc.yaml", _small_args(tiny_llama, data16, two, *extra, steps=1)))
    assert res.returncode == 0, res.stdout[-4000:]
    a, b = (json.loads((d / "summary.json").read_text())["eval_loss"] for d in (one, two))
    assert a == pytest.approx(b, rel=1e-6), (a, b)


@pytest.mark.slow
def test_save_failure_on_the_main_process_ends_every_rank_with_its_message(tiny_llama, data16, tmp_path):
    out = tmp_path / "run"
    start = time.time()
    res = run(
        launch_cmd(
            "cpu_2proc.yaml",
            _small_args(tiny_llama, data16, out, "--no-lora"),
            script=str(REPO / "tests" / "helpers_dist.py"),
        ),
        timeout=180,
        env=clean_env(FNSCALE_TEST_TRACE=str(tmp_path / "trace"), FNSCALE_TEST_FAIL_SAVE_RANK="0"),
    )
    elapsed = time.time() - start
    assert res.returncode != 0, res.stdout[-4000:]
    assert elapsed < 60 + 30, (
        f"the ranks took {elapsed:.0f}s to exit"
    )  # 30 s: two processes starting and training 2 steps on a busy CPU
    errors = [line for line in res.stdout.splitlines() if line.startswith("error:")]
    assert any("No space left on device (injected" in e and "rank 0 failed" not in e for e in errors), res.stdout[
        -4000:
    ]  # rank 0's own
    assert any(
        e.startswith("error: rank 0 failed while saving the final model:") and "No space left" in e for e in errors
    ), res.stdout[-4000:]
    assert not (out / "final").exists()
    assert (
        "fnscale/train.py" not in res.stdout
    )  # one line per rank, no worker traceback (the launcher prints its own ChildFailedError)


@pytest.mark.slow
def test_training_failure_on_one_rank_ends_every_rank_with_its_message(tiny_llama, data16, tmp_path):
    """Rank 1 fails in its second training step while rank 0 waits for it in the gradient all-reduce."""
    start = time.time()
    res = run(
        launch_cmd(
            "cpu_2proc.yaml",
            _small_args(tiny_llama, data16, tmp_path / "run", "--no-lora", steps=4),
            script=str(REPO / "tests" / "helpers_dist.py"),
        ),
        timeout=180,
        env=clean_env(FNSCALE_TEST_TRACE=str(tmp_path / "trace"), FNSCALE_TEST_FAIL_STEP_RANK="1"),
    )
    elapsed = time.time() - start
    assert res.returncode != 0, res.stdout[-4000:]
    assert elapsed < 60 + 30, f"the ranks took {elapsed:.0f}s to exit"  # 30 s: two processes starting on a busy CPU
    assert "error: rank 1 failed in its training step (injected)" in res.stdout, res.stdout[-4000:]
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_repeated_two_process_launches_all_exit_zero(tiny_llama, data16, tmp_path):
    """10 QLoRA/ZeRO-3 and 10 DDP launches, 2 steps each: a rank that aborts at exit (SIGABRT) fails the launch."""
    codes = {"cpu_2proc_zero3.yaml": [], "cpu_2proc.yaml": []}
    start = time.time()
    for i in range(10):
        for config, extra in (
            ("cpu_2proc_zero3.yaml", ("--load-in-4bit", "--lora-dropout", "0")),
            ("cpu_2proc.yaml", ("--no-lora",)),
        ):
            res = run(launch_cmd(config, _small_args(tiny_llama, data16, tmp_path / f"{config}-{i}", *extra)))
            codes[config].append(res.returncode)
            assert res.returncode == 0, f"launch {i} of {config}: exit {res.returncode}\n{res.stdout[-4000:]}"
    print(f"\n20 launches, all exit 0, in {time.time() - start:.0f}s: {codes}")
