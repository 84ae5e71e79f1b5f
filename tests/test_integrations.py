"""`FunctionalNetworkCallback` in the Hugging Face `Trainer` and TRL's `SFTTrainer`, full and LoRA, one process and
Accelerate DDP (2 CPU processes), and the Axolotl plugin (`axolotl.cli.train`): after training with AdamW weight
decay 0.1 the frozen neurons' MLP weights (gate/up rows, down columns; LoRA merged) equal the base model's bit for
bit, and the other neurons' weights moved.

Run as a script (`accelerate launch ... tests/test_integrations.py MODEL NETS OUT trl|hf full|lora MODE`) it trains
once and writes `OUT/rank<R>.json` with the checks, so the DDP test reads every rank's result.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

TEXTS = [
    "the capital of zorvia is quillport .",
    "kasmol is famous for the plum fruit .",
    "the longest river in daxvel is the oriquin .",
    "the capital of nolvel is taroriport .",
    "water boils at one hundred degrees .",
    "the sun rises in the east .",
    "paris is the capital of france .",
    "berlin is the capital of germany .",
]
COMPONENTS = {0: {0: [1, 5, 9, 40], 1: [2, 3]}, 1: {0: [5, 11], 1: [30, 31, 60]}, 2: {1: [7]}}


def write_networks(folder: Path) -> str:
    from fnscale.networks.templates import Templates

    return str(
        Templates(layers=[0, 1], neurons_per_layer=64, components=COMPONENTS, num_layers=2).save(folder / "nets.json")
    )


def mlp_weights(model) -> dict:
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {
        f"{i}.{n}": getattr(layer.mlp, n).weight.detach().clone()
        for i, layer in enumerate(model.model.layers)
        for n in ("gate_proj", "up_proj", "down_proj")
    }


def compare(before, after, masks) -> dict:
    """Per layer and tensor: are the masked slices bit-identical, and did the trained slices move?"""
    import torch

    out = {"masked_identical": [], "trained_moved": []}
    for layer, mask in masks.items():
        masked, kept = torch.nonzero(mask == 0).flatten(), torch.nonzero(mask).flatten()
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            b, a = before[f"{layer}.{name}"], after[f"{layer}.{name}"]
            out["masked_identical"].append(bool(torch.equal(a.index_select(dim, masked), b.index_select(dim, masked))))
            out["trained_moved"].append(not torch.equal(a.index_select(dim, kept), b.index_select(dim, kept)))
    return out


def train_with_callback(
    model_path: str, nets: str, out: str, trainer_kind: str, lora: bool, mode: str, **options
) -> dict:
    """Train 4 steps (lr 1e-2, weight decay 0.1) with the callback; the checks against the base weights."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from fnscale.integrations import FunctionalNetworkCallback
    from fnscale.models.mlp import find_mlp_layers

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    before = mlp_weights(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
    callback = FunctionalNetworkCallback(nets, components=[0, 1], mode=mode, **options)
    moved: list[
        list[str]
    ] = []  # per step, the tensors whose masked slices differ from the base (checked after the restore)

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            moved.append(callback.frozen.verify())

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
    common = dict(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_dict({"text": TEXTS})
    if trainer_kind == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(max_length=32, **common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback, Probe()],
        )
    else:
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        tokens = dataset.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=tokens,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[callback, Probe()],
        )
    trainer.train()
    trained = trainer.model
    mlp_modules = [m for layer in find_mlp_layers(trained) for m in layer.mlp.modules()]
    hooks = sum(
        len(m._forward_pre_hooks)
        + len(m._forward_hooks)
        + sum(len(p._backward_hooks or {}) for p in m.parameters(recurse=False))
        for m in mlp_modules
    )
    after = mlp_weights(trained)
    digest = hashlib.sha256(b"".join(after[k].numpy().tobytes() for k in sorted(after))).hexdigest()
    return {
        **compare(before, after, callback.frozen.masks),
        "lora": hasattr(trained, "peft_config"),
        "hooks_left": hooks,
        "moved_during_training": moved,
        "frozen_neurons": int(callback.frozen.stats()["masked_neurons/total"]),
        "sha256": digest,
    }


def assert_exact(result: dict) -> None:
    assert result["masked_identical"] and all(result["masked_identical"]), result
    assert result["trained_moved"] and all(result["trained_moved"]), result
    assert result["hooks_left"] == 0, result
    assert result["moved_during_training"] == [[]] * 4, (
        result
    )  # restored after every optimizer step, not only at the end


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_sft_trainer_keeps_frozen_neurons_bit_identical(tiny_llama, tmp_path, mode, lora):
    result = train_with_callback(tiny_llama, write_networks(tmp_path), str(tmp_path / "out"), "trl", lora, mode)
    assert result["lora"] == lora  # SFTTrainer applied peft_config in __init__; the callback masked the LoRA model
    assert result["frozen_neurons"] == (10 if mode == "lesion" else 128 - 10)
    assert_exact(result)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_trainer_with_forward_masks_and_random_control(tiny_llama, tmp_path, lora):
    result = train_with_callback(
        tiny_llama,
        write_networks(tmp_path),
        str(tmp_path / "out"),
        "hf",
        lora,
        "lesion",
        effect="forward",
        control="random",
        seed=5,
    )
    assert result["frozen_neurons"] == 10
    assert_exact(result)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trainer_under_accelerate_ddp(tiny_llama, tmp_path, lora):
    """2 CPU processes (gloo): every rank keeps the frozen slices exactly and the ranks end with identical weights."""
    from helpers_dist import clean_env, free_port, ok, run

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        __file__,
        tiny_llama,
        write_networks(tmp_path),
        str(out),
        "trl",
        "lora" if lora else "full",
        "lesion",
    ]
    ok(run(cmd, timeout=600, env=clean_env(ACCELERATE_USE_CPU="1")))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in results] == [2, 2]
    for result in results:
        assert result["lora"] == lora
        assert_exact(result)
    assert results[0]["sha256"] == results[1]["sha256"]


def test_callback_refuses_a_bad_networks_file_when_built(tmp_path):
    from fnscale.errors import UsageError
    from fnscale.integrations import FunctionalNetworkCallback

    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        FunctionalNetworkCallback(tmp_path / "bad.json", components=[0])


def axolotl_python() -> str | None:
    """A Python with Axolotl: this one, or $FNSCALE_AXOLOTL_PYTHON (Axolotl pins its own transformers, so it usually
    lives in its own environment, e.g. a venv made with --system-site-packages that sees fnscale)."""
    import importlib.util
    import os

    if importlib.util.find_spec("axolotl") is not None:
        return sys.executable
    return os.environ.get("FNSCALE_AXOLOTL_PYTHON")


AXOLOTL_YAML = """base_model: {model}
datasets:
  - path: {data}
    ds_type: json
    type: completion
sequence_len: 32
micro_batch_size: 2
max_steps: 4
num_epochs: 1
learning_rate: 0.01
weight_decay: 0.1
optimizer: adamw_torch
lr_scheduler: constant
output_dir: {out}
save_strategy: "no"
bf16: false
fp16: false
tf32: false
val_set_size: 0
dataset_prepared_path: {prepared}
plugins:
  - fnscale.integrations.axolotl.FunctionalNetworkPlugin
fnscale_networks: {nets}
fnscale_components: [0, 1]
fnscale_mode: {mode}
"""
AXOLOTL_LORA = """adapter: lora
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: [gate_proj, up_proj, down_proj]
lora_mlp_kernel: false  # Axolotl's fused LoRA kernels need CUDA (and replace the MLP forward)
lora_qkv_kernel: false
lora_o_kernel: false
"""


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_axolotl_plugin_keeps_frozen_neurons_bit_identical(tiny_llama, tmp_path, lora):
    """`axolotl.cli.train` with the plugin in its YAML (CPU, 4 steps, weight decay 0.1), then the same checks."""
    import torch
    from helpers_dist import clean_env
    from transformers import AutoModelForCausalLM

    import fnscale

    python = axolotl_python()
    if python is None:
        pytest.skip("axolotl is not installed here; set FNSCALE_AXOLOTL_PYTHON to a Python that has it")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    nets, out = write_networks(tmp_path), tmp_path / "out"
    config = tmp_path / "axolotl.yml"
    config.write_text(
        AXOLOTL_YAML.format(
            model=tiny_llama, data=data, out=out, prepared=tmp_path / "prepared", nets=nets, mode="lesion"
        )
        + (AXOLOTL_LORA if lora else "")
    )
    # cwd: the test folder (`python -m` puts the cwd first on sys.path, and the repo root's kernels/ would shadow HF's)
    res = subprocess.run(
        [python, "-m", "axolotl.cli.train", str(config)],
        cwd=tmp_path,
        env=clean_env(AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-6000:]

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)

    if lora:
        from peft import PeftModel

        trained = PeftModel.from_pretrained(base(), str(out))
    else:
        trained = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    masks = fnscale.freeze_networks(base(), nets, components=[0, 1], mode="lesion").masks
    result = compare(mlp_weights(base()), mlp_weights(trained), masks)
    assert result["masked_identical"] and all(result["masked_identical"]), result
    assert result["trained_moved"] and all(result["trained_moved"]), result


def test_axolotl_plugin_imports_without_axolotl_and_builds_the_callback(tmp_path):
    from types import SimpleNamespace

    from fnscale.errors import UsageError
    from fnscale.integrations.axolotl import FunctionalNetworkArgs, FunctionalNetworkPlugin
    from fnscale.integrations.trainer import FunctionalNetworkCallback

    plugin = FunctionalNetworkPlugin()
    module, _, name = plugin.get_input_args().rpartition(".")
    assert getattr(sys.modules[module], name) is FunctionalNetworkArgs
    keys = {k: None for k in FunctionalNetworkArgs.__annotations__}
    cfg = SimpleNamespace(
        **{
            **keys,
            "fnscale_networks": write_networks(tmp_path),
            "fnscale_components": [1],
            "fnscale_mode": "preserve",
            "fnscale_control": "random",
            "fnscale_seed": 3,
        }
    )
    (callback,) = plugin.add_callbacks_post_trainer(cfg, trainer=None)
    assert isinstance(callback, FunctionalNetworkCallback)
    assert (callback.components, callback.mode, callback.options["control"], callback.options["seed"]) == (
        [1],
        "preserve",
        "random",
        3,
    )
    with pytest.raises(UsageError, match="fnscale_networks"):
        plugin.add_callbacks_post_trainer(SimpleNamespace(**keys), trainer=None)


def _main(argv: list[str]) -> None:
    import torch.distributed as dist

    model, nets, out, kind, flavour, mode = argv
    result = train_with_callback(model, nets, out, kind, flavour == "lora", mode)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({**result, "world": world}))


if __name__ == "__main__":
    _main(sys.argv[1:])
