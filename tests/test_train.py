"""Training on tiny models: the loss goes down, outputs are written, resume reaches the same step, config overrides."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fnscale.config import TrainConfig
from fnscale.recipes.train import train
from fnscale.runtime.metrics import read_metrics


def cfg(model, data, out, **kw):
    base = dict(
        model=model,
        dataset=data,
        output_dir=str(out),
        max_seq_length=64,
        batch_size=4,
        validation_split=0.0,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_steps=30,
        eval_steps=0,
        save_steps=0,
        report_to="tensorboard",
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _first_last(out):
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    return rows, sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3


def test_full_finetune_memorises_and_writes_outputs(tiny_llama, sft_file, tmp_path):
    summary = train(cfg(tiny_llama, sft_file, tmp_path, lora=False))
    rows, first, last = _first_last(tmp_path)
    assert len(rows) == 30
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(rows[0])
    assert last < 0.2 * first, (first, last)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents*"))
    assert summary["steps"] == 30


def test_lora_training_lowers_loss_and_saves_adapter(tiny_llama, sft_file, tmp_path):
    # LoRA on a random 32-wide model learns slowly, so the bar is lower than for full fine-tuning.
    train(cfg(tiny_llama, sft_file, tmp_path, learning_rate=5e-2))
    rows, first, last = _first_last(tmp_path)
    assert last < first - 0.1, (first, last)
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "final" / "adapter_config.json").is_file()


def test_full_finetune_gpt2_and_merge(tiny_gpt2, sft_file, tmp_path):
    train(cfg(tiny_gpt2, sft_file, tmp_path, lora=False, max_steps=5))
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_merge_adapter_saves_a_loadable_model(tiny_llama, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    train(cfg(tiny_llama, sft_file, tmp_path, max_steps=3, merge_adapter=True))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_resume_reaches_the_same_final_step_and_weights(tiny_llama, sft_file, tmp_path):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    train(cfg(tiny_llama, sft_file, full, max_steps=6, save_steps=3, lora=False))
    part = tmp_path / "part"
    train(cfg(tiny_llama, sft_file, part, max_steps=6, save_steps=3, lora=False))
    # Simulate an interruption after step 3: drop everything past the checkpoint.
    import shutil

    shutil.rmtree(part / "final")
    assert (part / "checkpoint-3" / "trainer_state.json").is_file()
    summary = train(
        cfg(tiny_llama, sft_file, part, max_steps=6, save_steps=3, lora=False, resume_from_checkpoint="auto")
    )
    assert summary["steps"] == 6
    a, b = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    steps = [r["step"] for r in read_metrics(part / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_corrupt_latest_checkpoint_falls_back(tiny_llama, sft_file, tmp_path, caplog):
    train(cfg(tiny_llama, sft_file, tmp_path, max_steps=4, save_steps=2, save_total_limit=3))
    # checkpoint-2 exists; fake a newer, corrupt one
    bad = tmp_path / "checkpoint-3"
    bad.mkdir()
    (bad / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0, "batches_in_epoch": 3}))
    (bad / "model.safetensors").write_bytes(b"garbage")
    summary = train(cfg(tiny_llama, sft_file, tmp_path, max_steps=4, save_steps=2, resume_from_checkpoint="auto"))
    assert summary["steps"] == 4
    assert "cannot load checkpoint" in caplog.text


def test_cli_help_lists_defaults():
    from fnscale.cli.app import cli

    out = CliRunner().invoke(cli, ["train", "--help"]).output
    for flag in [
        "--model",
        "--dataset",
        "--output-dir",
        "--lora / --no-lora",
        "--load-in-4bit",
        "--resume-from-checkpoint",
        "--mask-mode",
        "--config",
        "--push-to-hub",
    ]:
        assert flag in out, flag
    assert "[default: 512]" in out and "[default: cosine]" in out


def test_yaml_config_is_overridden_by_flags(tiny_llama, sft_file, tmp_path):
    from fnscale.cli.app import cli

    conf = tmp_path / "c.yaml"
    conf.write_text(
        f"model: {tiny_llama}\ndataset: {sft_file}\nmax_steps: 2\nlearning_rate: 0.001\nvalidation_split: 0.0\n"
    )
    out = tmp_path / "run"
    res = CliRunner().invoke(
        cli, ["train", "--config", str(conf), "--max-steps", "3", "--output-dir", str(out), "--report-to", "none"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3  # flag beat YAML
    assert summary["config"]["learning_rate"] == 0.001  # YAML beat default


def test_push_to_hub_sends_the_final_folder(tiny_llama, sft_file, tmp_path, monkeypatch):
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            sent["token_given"] = token is not None

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            sent["repo"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            sent["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    summary = train(
        cfg(tiny_llama, sft_file, tmp_path, max_steps=2, push_to_hub=True, hub_repo_id="me/tiny", hub_private=True)
    )
    assert sent["repo"] == ("me/tiny", True) and sent["token_given"]
    assert "adapter_model.safetensors" in sent["files"]
    assert summary["hub_url"].endswith("me/tiny")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"hf_secret_token_123" not in f.read_bytes(), f


def test_qlora_training_on_cpu(tiny_llama, sft_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    summary = train(cfg(tiny_llama, sft_file, tmp_path, max_steps=3, load_in_4bit=True, learning_rate=1e-2))
    assert summary["steps"] == 3
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["loss"] is not None and r["loss"] > 0 for r in rows if "loss" in r)
