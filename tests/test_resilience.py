"""Nothing lost: non-finite steps are skipped or stop the run cleanly; kill -9 resumes from the last checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fnscale.config import TrainConfig
from fnscale.errors import RunError
from fnscale.recipes import train as train_mod
from fnscale.runtime.metrics import read_metrics


def _poisoned(bad_calls):
    """A `build_model` for `train()` whose embedding output is NaN on the given forward calls (1-based): a non-finite loss."""

    def build(cfg, accelerator):
        source, tok, model = train_mod.build_model(cfg, accelerator)
        calls = {"n": 0}

        def hook(module, args, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] in bad_calls(calls["n"]) else output

        model.get_input_embeddings().register_forward_hook(hook)
        return source, tok, model

    return build


def cfg(model, data, out, **kw):
    base = dict(
        model=model,
        dataset=data,
        output_dir=str(out),
        max_seq_length=64,
        validation_split=0.0,
        max_steps=5,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        lora=False,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def test_nonfinite_steps_are_skipped(tiny_llama, sft_file, tmp_path, caplog):
    summary = train_mod.train(cfg(tiny_llama, sft_file, tmp_path), build_model=_poisoned(lambda n: {2, 3}))
    assert summary["steps"] == 5
    assert caplog.text.count("non-finite loss or gradient") == 2
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 5 and all(l is not None for l in losses)


def test_too_many_bad_steps_stop_without_saving_nan(tiny_llama, sft_file, tmp_path):
    with pytest.raises(RunError, match="3 non-finite steps in a row"):
        train_mod.train(
            cfg(tiny_llama, sft_file, tmp_path, max_steps=20, max_bad_steps=3, save_steps=1),
            build_model=_poisoned(lambda n: {n} if n > 2 else set()),
        )
    assert not (tmp_path / "final").exists()
    for ckpt in tmp_path.glob("checkpoint-*"):
        for f in ckpt.glob("*.safetensors"):
            assert all(torch.isfinite(w).all() for w in load_file(f).values()), f


@pytest.mark.slow
def test_kill9_then_resume_reaches_the_same_end(tiny_llama, sft_file, tmp_path):
    """A SIGKILL mid-run leaves the last complete checkpoint; `--resume-from-checkpoint auto` finishes the job
    with the same data order, so the final weights equal an uninterrupted run's."""

    def args(out):
        return [
            sys.executable,
            "-m",
            "fnscale",
            "train",
            "--model",
            tiny_llama,
            "--dataset",
            sft_file,
            "--output-dir",
            str(out),
            "--max-steps",
            "400",
            "--save-steps",
            "20",
            "--save-total-limit",
            "2",
            "--no-lora",
            "--report-to",
            "none",
            "--validation-split",
            "0",
            "--max-seq-length",
            "64",
            "--batch-size",
            "2",
            "--seed",
            "5",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(args(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(args(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-60" / "trainer_state.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it was killed; raise --max-steps"
    res = subprocess.run(
        args(out) + ["--resume-from-checkpoint", "auto"], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 401))
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
