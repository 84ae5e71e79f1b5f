"""The public Python API (`fnscale.load_networks`, `build_networks`, `freeze_networks`): a plain AdamW loop with weight
decay on a tiny Llama keeps the frozen neurons' weights bit-identical (gate/up rows, down columns), full and LoRA,
lesion and preserve, update and forward masks, random control; the other neurons' weights move; `remove()` takes
every hook off."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fnscale
from fnscale.errors import UsageError
from fnscale.networks.templates import Templates

# Networks of the tiny Llama (2 layers x 64 neurons): three components, each with neurons in both layers.
COMPONENTS = {0: {0: [1, 5, 9, 40], 1: [2, 3]}, 1: {0: [5, 11], 1: [30, 31, 60]}, 2: {1: [7]}}


def networks_file(tmp_path) -> str:
    return str(
        Templates(layers=[0, 1], neurons_per_layer=64, components=COMPONENTS, num_layers=2, model="tiny").save(
            tmp_path / "nets.json"
        )
    )


def load(path: str, lora: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
        )
    return model


def mlp_weights(model) -> dict[str, torch.Tensor]:
    """gate/up/down weights per layer (LoRA merged first), cloned."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {
        f"{i}.{n}": getattr(layer.mlp, n).weight.detach().clone()
        for i, layer in enumerate(model.model.layers)
        for n in ("gate_proj", "up_proj", "down_proj")
    }


def train(model, frozen, steps: int = 4, restore: bool = True) -> None:
    """AdamW with weight decay on random tokens; `frozen.restore()` after each optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if restore:
            frozen.restore()


def assert_frozen_exactly(before, after, masks):
    """Masked neurons' slices equal the base bit for bit; the kept neurons' slices moved in every tensor."""
    for layer, mask in masks.items():
        masked, kept = torch.nonzero(mask == 0).flatten(), torch.nonzero(mask).flatten()
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            b, a = before[f"{layer}.{name}"], after[f"{layer}.{name}"]
            assert torch.equal(a.index_select(dim, masked), b.index_select(dim, masked)), (
                f"layer {layer} {name}: masked slice moved"
            )
            assert not torch.equal(a.index_select(dim, kept), b.index_select(dim, kept)), (
                f"layer {layer} {name}: trained slice did not move"
            )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("effect", ["update", "forward"])
@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_trained_model_keeps_masked_neurons_bit_identical(tiny_llama, tmp_path, mode, effect, lora):
    nets = fnscale.load_networks(networks_file(tmp_path))
    model = load(tiny_llama, lora)
    before = mlp_weights(load(tiny_llama))
    frozen = fnscale.freeze_networks(model, nets, components=[0, 1], mode=mode, effect=effect)
    selected = {0: {1, 5, 9, 40, 11}, 1: {2, 3, 30, 31, 60}}
    for layer, mask in frozen.masks.items():
        frozen_ids = set(torch.nonzero(mask == 0).flatten().tolist())
        assert frozen_ids == (selected[layer] if mode == "lesion" else set(range(64)) - selected[layer])
    train(model, frozen)
    assert frozen.verify() == []
    frozen.remove()
    assert_frozen_exactly(before, mlp_weights(model), frozen.masks)


def test_without_restore_weight_decay_moves_the_masked_slices(tiny_llama, tmp_path):
    """The check above can fail: gradient hooks alone leave AdamW's decay on the masked slices."""
    model = load(tiny_llama)
    frozen = fnscale.freeze_networks(model, networks_file(tmp_path), components=[0], mode="lesion")
    train(model, frozen, steps=2, restore=False)
    moved = frozen.verify()
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= set(moved)
    frozen.restore()
    assert frozen.verify() == []


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_random_control_is_size_matched_seeded_and_frozen_exactly(tiny_llama, tmp_path, lora):
    path = networks_file(tmp_path)
    model = load(tiny_llama, lora)
    before = mlp_weights(load(tiny_llama))
    frozen = fnscale.freeze_networks(model, path, components=[0, 1], mode="lesion", control="random", seed=3)
    same = fnscale.freeze_networks(load(tiny_llama), path, components=[0, 1], control="random", seed=3)
    other = fnscale.freeze_networks(load(tiny_llama), path, components=[0, 1], control="random", seed=4)
    networks = fnscale.freeze_networks(load(tiny_llama), path, components=[0, 1])
    for layer, mask in frozen.masks.items():
        assert int((mask == 0).sum()) == int((networks.masks[layer] == 0).sum())  # same size per layer
        assert torch.equal(mask, same.masks[layer])
    assert any(not torch.equal(frozen.masks[k], other.masks[k]) for k in frozen.masks)
    assert any(not torch.equal(frozen.masks[k], networks.masks[k]) for k in frozen.masks)
    train(model, frozen)
    frozen.remove()
    assert_frozen_exactly(before, mlp_weights(model), frozen.masks)


def test_forward_masks_equal_zeroed_down_columns_and_remove_takes_every_hook_off(tiny_llama, tmp_path):
    """effect="forward" computes what a model with the masked neurons' down columns zeroed computes (float32,
    atol 1e-6); update masks leave the forward alone; after remove() no hook is left and gradients reach every slice."""
    path = networks_file(tmp_path)
    ids = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    model = load(tiny_llama)
    model.eval()
    plain = model(input_ids=ids).logits

    def hooks():
        mods = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
        return mods + sum(len(p._backward_hooks or {}) for p in model.parameters())

    assert hooks() == 0
    frozen = fnscale.freeze_networks(model, path, components=[0, 1], effect="forward")
    assert hooks() > 0
    reference = load(tiny_llama)
    with torch.no_grad():
        for layer, mask in frozen.masks.items():
            reference.model.layers[layer].mlp.down_proj.weight.mul_(mask)
    reference.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)
    frozen.remove()
    assert hooks() == 0
    assert torch.equal(model(input_ids=ids).logits, plain)

    update = fnscale.freeze_networks(model, path, components=[0, 1], effect="update")
    assert torch.equal(model(input_ids=ids).logits, plain)  # the forward pass stays whole
    model(input_ids=ids, labels=ids).loss.backward()
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.count_nonzero(down.grad[:, [1, 5, 9, 40, 11]]) == 0
    model.zero_grad()
    with update:
        pass  # the context manager removes
    assert hooks() == 0
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.count_nonzero(down.grad[:, [1, 5, 9, 40, 11]]) > 0


def test_usage_errors_say_what_to_fix(tiny_llama, tmp_path):
    path = networks_file(tmp_path)
    model = load(tiny_llama)
    with pytest.raises(UsageError, match="unknown mode"):
        fnscale.freeze_networks(model, path, components=[0], mode="keep")
    with pytest.raises(UsageError, match="unknown effect"):
        fnscale.freeze_networks(model, path, components=[0], effect="both")
    with pytest.raises(UsageError, match="component 7 is not in this template"):
        fnscale.freeze_networks(model, path, components=[7])
    wide = Templates(layers=[0, 1], neurons_per_layer=128, components={0: {0: [1]}}, num_layers=2)
    with pytest.raises(UsageError, match="template was built for"):
        fnscale.freeze_networks(model, wide, components=0)
    with pytest.raises(UsageError, match="not found"):
        fnscale.load_networks(tmp_path / "missing.json")
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 0  # refusals leave nothing behind


def test_build_networks_finds_networks_that_freeze_networks_uses(tiny_llama, sft_file, tmp_path, tiny_tokenizer):
    model = load(tiny_llama).train()
    nets = fnscale.build_networks(
        model,
        tiny_tokenizer,
        sft_file,
        components=3,
        percentile=90,
        samples_per_dataset=16,
        max_seq_length=64,
        output=tmp_path / "nets",
        progress=False,
    )
    assert model.training  # the capture's eval mode is undone
    assert (
        nets.site == "intermediate"
        and nets.layers == [0, 1]
        and nets.neurons_per_layer == 64
        and len(nets.components) == 3
    )
    sizes = [sum(len(v) for v in c.values()) for c in nets.components.values()]
    assert all(s == round(0.1 * 128) or abs(s - 0.1 * 128) <= 2 for s in sizes), sizes  # ~10% of 2 x 64 neurons each
    saved = fnscale.load_networks(tmp_path / "nets" / "global_templates.json")
    assert {c: {l: v.tolist() for l, v in m.items()} for c, m in saved.components.items()} == {
        c: {l: v.tolist() for l, v in m.items()} for c, m in nets.components.items()
    }
    before = mlp_weights(load(tiny_llama))
    frozen = fnscale.freeze_networks(model, saved, components=[0, 1], mode="lesion")
    train(model, frozen)
    frozen.remove()
    assert_frozen_exactly(before, mlp_weights(model), frozen.masks)


def test_import_fnscale_stays_light():
    """`import fnscale` (what `fnscale --help` and preflight pay for) imports neither torch nor transformers."""
    code = (
        "import sys, fnscale, fnscale.integrations; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy; "
        "assert callable(fnscale.freeze_networks) and 'torch' in sys.modules"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert set(fnscale.__all__) >= {"load_networks", "build_networks", "freeze_networks"}
    assert fnscale.Templates is Templates
