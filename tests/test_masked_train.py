"""Masked SFT end to end through `train`: masked neurons come out bit-identical to the base model."""

import pytest
import torch
from safetensors.torch import load_file

from fnscale.config import TrainConfig
from fnscale.networks.templates import Templates
from fnscale.recipes.train import train
from fnscale.runtime.metrics import read_metrics

NEURONS = {0: [1, 5, 9, 30, 41], 1: [0, 2, 33, 60]}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    t = Templates(
        layers=[0, 1], neurons_per_layer=64, components={0: NEURONS, 1: {0: [7], 1: [8]}}, model="tiny", num_layers=2
    )
    return str(t.save(tmp_path_factory.mktemp("tpl") / "t.json"))


def run(model, data, out, template, mode, lora):
    cfg = TrainConfig(
        model=model,
        dataset=data,
        output_dir=str(out),
        max_seq_length=64,
        validation_split=0.0,
        learning_rate=5e-2,
        weight_decay=0.1,
        max_steps=4,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        lora=lora,
        merge_adapter=lora,
        mask_mode=mode,
        ica_template_path=template,
        ica_component_ids="0",
        seed=3,
    )
    train(cfg)
    return load_file(out / ("merged" if lora else "final") / "model.safetensors")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_masked_neurons_untouched(tiny_llama, sft_file, template_file, tmp_path, mode, lora):
    base = load_file(f"{tiny_llama}/model.safetensors")
    after = run(tiny_llama, sft_file, tmp_path, template_file, mode, lora)
    changed_unmasked = False
    for layer, chosen in NEURONS.items():
        masked = torch.tensor(chosen) if mode == "lesion" else torch.tensor(sorted(set(range(64)) - set(chosen)))
        kept = torch.tensor(sorted(set(range(64)) - set(masked.tolist())))
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            key = f"model.layers.{layer}.mlp.{name}.weight"
            assert torch.equal(base[key].index_select(dim, masked), after[key].index_select(dim, masked)), (
                key,
                mode,
                lora,
            )
            changed_unmasked |= not torch.equal(base[key].index_select(dim, kept), after[key].index_select(dim, kept))
    assert changed_unmasked, "training changed nothing: the test would pass vacuously"
    stats = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "masked_neurons/total" in r]
    expected = sum(len(v) for v in NEURONS.values()) if mode == "lesion" else sum(64 - len(v) for v in NEURONS.values())
    assert stats and stats[0]["masked_neurons/total"] == expected


def test_saved_model_runs_unmasked(tiny_llama, sft_file, template_file, tmp_path):
    """Masks are removed before saving: the saved model's MLP uses every neuron again."""
    from transformers import AutoModelForCausalLM

    run(tiny_llama, sft_file, tmp_path, template_file, "lesion", False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks
    seen = {}
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model(input_ids=torch.tensor([[2, 5, 6, 7]]))
    assert (seen["x"][..., NEURONS[0]].abs() > 0).all()


def test_templates_computed_when_no_path(tiny_llama, sft_file, tmp_path):
    cfg = TrainConfig(
        model=tiny_llama,
        dataset=sft_file,
        output_dir=str(tmp_path),
        max_seq_length=64,
        validation_split=0.0,
        max_steps=2,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        mask_mode="preserve",
        ica_component_ids="0,1",
        ica_components=3,
        ica_percentile=90,
        ica_samples=16,
    )
    train(cfg)
    t = Templates.load(tmp_path / "templates" / "global_templates.json")
    assert t.n_components == 3 and t.layers == [0, 1] and (tmp_path / "templates" / "coverage.png").is_file()
    assert all(sum(len(v) for v in t.components[c].values()) > 0 for c in range(3))
