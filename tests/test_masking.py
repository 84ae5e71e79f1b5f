"""Masking on tiny random Llama and GPT-2 models: placement, equivalence of the paths, removal, and the
untouched guarantee (masked neurons' weights bit-identical to the base after AdamW with weight decay)."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from fnscale.errors import UsageError
from fnscale.masking import (
    MaskHandle,
    apply_masks,
    build_masks,
    find_mlp_layers,
    protect_masked_weights,
)

VOCAB, WIDTH_LLAMA, WIDTH_GPT2, HIDDEN = 128, 64, 128, 32


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=WIDTH_LLAMA,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).train()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=HIDDEN,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).train()


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
WIDTH = {"llama": WIDTH_LLAMA, "gpt2": WIDTH_GPT2}


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 16), generator=g)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def neuron_slices(state, arch, layer, idx):
    """The weights that belong to intermediate neurons `idx` of `layer`, from a state dict."""
    if arch == "llama":
        p = f"model.layers.{layer}.mlp."
        return {
            "gate rows": state[p + "gate_proj.weight"][idx],
            "up rows": state[p + "up_proj.weight"][idx],
            "down cols": state[p + "down_proj.weight"][:, idx],
        }
    p = f"transformer.h.{layer}.mlp."
    return {
        "c_fc cols": state[p + "c_fc.weight"][:, idx],
        "c_fc bias": state[p + "c_fc.bias"][idx],
        "c_proj rows": state[p + "c_proj.weight"][idx],
    }


# -- finding the MLPs ------------------------------------------------------------------------------


def test_find_mlp_layers_llama_and_gpt2():
    llama = find_mlp_layers(tiny_llama())
    assert [(x.kind, x.act, x.width, x.hidden) for x in llama] == [("gated", "silu", 64, 32)] * 2
    assert all(x.down is x.mlp.down_proj and len(x.ups) == 2 for x in llama)
    gpt2 = find_mlp_layers(tiny_gpt2())
    assert [(x.kind, x.act, x.width, x.hidden) for x in gpt2] == [("gpt2", "gelu_tanh", 128, 32)] * 2
    assert all(x.down is x.mlp.c_proj and x.ups == [(x.mlp.c_fc, False)] for x in gpt2)


def test_find_unwraps_peft_and_bitsandbytes():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["down_proj", "gate_proj"]))
    layers = find_mlp_layers(model)
    assert [x.width for x in layers] == [64, 64]
    assert all(hasattr(x.down, "base_layer") and x.down is x.mlp.down_proj for x in layers)

    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.down_proj = bnb.nn.Linear8bitLt(WIDTH_LLAMA, HIDDEN, bias=False, has_fp16_weights=False)
        layer.mlp.up_proj = bnb.nn.Linear4bit(HIDDEN, WIDTH_LLAMA, bias=False)
    layers = find_mlp_layers(model)
    assert all(x.down is x.mlp.down_proj and x.width == 64 and len(x.ups) == 2 for x in layers)


def test_find_refuses_a_model_without_down_projection():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.down_proj = nn.Identity()
    with pytest.raises(UsageError, match="could not find the MLP down projection in LlamaForCausalLM"):
        find_mlp_layers(model)


# -- build_masks -----------------------------------------------------------------------------------


def test_build_masks_semantics():
    lesion = build_masks({0: [1, 3], 1: []}, "lesion", num_layers=3, width=5)
    assert list(lesion) == [0]  # layers with nothing removed carry no mask
    assert lesion[0].tolist() == [1, 0, 1, 0, 1] and lesion[0].dtype == torch.float32
    preserve = build_masks({"0": [1, 3], 2: [0, 1, 2, 3, 4]}, "preserve", num_layers=3, width=5)
    assert list(preserve) == [0]  # layer 1 (nothing selected) unmasked; layer 2 keeps everything
    assert preserve[0].tolist() == [0, 1, 0, 1, 0]
    only = build_masks({0: [1], 1: [2]}, "lesion", num_layers=3, width=5, layers=[1])
    assert list(only) == [1] and only[1].tolist() == [1, 1, 0, 1, 1]


@pytest.mark.parametrize(
    "neurons, mode, layers, message",
    [
        ({0: []}, "lesion", None, "changes nothing"),
        ({0: range(5), 1: range(5)}, "preserve", None, "changes nothing"),
        ({0: [1]}, "lesion", [1], "changes nothing"),
        ({0: range(5), 1: range(5)}, "lesion", None, "removes every MLP neuron"),
        ({0: [5]}, "lesion", None, "neuron 5 is outside 0..4"),
        ({2: [1]}, "lesion", None, "layers 0..1"),
        ({0: [1.5]}, "lesion", None, "must be integers"),
        ({0: [1]}, "ablate", None, "unknown mask mode"),
    ],
)
def test_build_masks_refusals(neurons, mode, layers, message):
    with pytest.raises(UsageError, match=message):
        build_masks(neurons, mode, num_layers=2, width=5, layers=layers)


# -- applying masks --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hook_equals_zeroing_the_down_projection_inputs(arch):
    model, ids = BUILD[arch]().eval(), batch()
    masks = build_masks({0: [0, 5, 9], 1: [3]}, "lesion", 2, WIDTH[arch])
    manual = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(find_mlp_layers(manual)):
            w = layer.down.weight  # Linear [out, in]: zero columns; Conv1D [in, out]: zero rows
            masked = masks[i] == 0
            if arch == "llama":
                w[:, masked] = 0
            else:
                w[masked] = 0
    with apply_masks(model, masks, kernel="torch") as handle:
        assert handle.paths == {0: "hook", 1: "hook"} and handle.stats() == {0: 3, 1: 1}
        torch.testing.assert_close(model(ids).logits, manual(ids).logits, rtol=1e-5, atol=1e-6)


def test_hook_keeps_dtype_and_zeroes_inputs_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    masks = build_masks({0: [2, 7]}, "lesion", 2, WIDTH_LLAMA)
    seen = []
    handle = apply_masks(model, masks, kernel="torch")
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(batch())
    handle.remove()
    assert seen[0].dtype == torch.bfloat16
    assert not seen[0][..., [2, 7]].any() and seen[0][..., 0].any()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mlp_output_site_zeroes_hidden_channels(arch):
    model, ids = BUILD[arch]().eval(), batch()
    masks = build_masks({0: [1, 4], 1: [0]}, "lesion", 2, HIDDEN)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(find_mlp_layers(manual)):
            masked = masks[i] == 0
            w = layer.down.weight  # output channels: Linear rows, Conv1D columns
            if arch == "llama":
                w[masked] = 0
            else:
                w[:, masked] = 0
            if layer.down.bias is not None:
                layer.down.bias[masked] = 0
    with apply_masks(model, masks, site="mlp_output") as handle:
        assert set(handle.paths.values()) == {"mlp_output"}
        torch.testing.assert_close(model(ids).logits, manual(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "site, mode, compact",
    [
        ("intermediate", "lesion", None),
        ("intermediate", "preserve", True),
        ("mlp_output", "lesion", None),
    ],
)
def test_remove_restores_the_model_exactly(arch, site, mode, compact):
    model, ids = BUILD[arch]().eval(), batch()
    before = model(ids).logits
    width = WIDTH[arch] if site == "intermediate" else HIDDEN
    handle = apply_masks(model, build_masks({0: [1, 2, 3]}, mode, 2, width), site=site, kernel="torch", compact=compact)
    assert not torch.equal(model(ids).logits, before)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(model(ids).logits, before)
    for layer in find_mlp_layers(model):
        assert "forward" not in vars(layer.mlp)
        assert not layer.down._forward_pre_hooks and not layer.mlp._forward_hooks


def test_compact_preserve_equals_masking():
    """Compact computes the same function; only summation order differs (fp32: rtol 1e-5, atol 1e-6)."""
    ids, neurons = batch(), {0: [0, 3, 17, 40], 1: [5, 6, 63]}
    results = {}
    for compact in (True, False):
        model = tiny_llama()
        handle = apply_masks(model, build_masks(neurons, "preserve", 2, WIDTH_LLAMA), kernel="torch", compact=compact)
        assert set(handle.paths.values()) == {"compact" if compact else "hook"}
        loss = loss_of(model, ids)
        loss.backward()
        results[compact] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    gate_grad = results[True][1]["model.layers.0.mlp.gate_proj.weight"]
    assert gate_grad[[0, 3, 17, 40]].abs().sum() > 0 and not gate_grad[[1, 2, 4]].any()


def test_compact_is_automatic_below_half_kept():
    model = tiny_llama()
    handle = apply_masks(model, build_masks({0: range(10), 1: range(40)}, "preserve", 2, WIDTH_LLAMA))
    assert handle.paths == {0: "compact", 1: "hook"}  # layer 1 keeps 40/64
    handle.remove()
    handle = apply_masks(model, build_masks({0: [1]}, "lesion", 2, WIDTH_LLAMA))
    assert handle.paths == {0: "hook"}
    handle.remove()
    # a hooked projection would be bypassed by the compact forward: fall back to masking
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None)
    handle = apply_masks(model, build_masks({0: range(10)}, "preserve", 2, WIDTH_LLAMA))
    assert handle.paths == {0: "hook"}
    handle.remove()


def test_apply_masks_refusals():
    model = tiny_llama()
    with pytest.raises(UsageError, match="has 10 entries but the model has 64 MLP neurons"):
        apply_masks(model, {0: torch.ones(10)})
    # the site comes from the templates (there is no --mask-site flag), so the hint names only real options
    with pytest.raises(
        UsageError, match=r"at site mlp_output \(the site comes from the templates\); use --mask-kernel torch"
    ):
        apply_masks(model, {0: torch.ones(HIDDEN)}, site="mlp_output", kernel="triton")
    with pytest.raises(UsageError, match="unknown mask site"):
        apply_masks(model, {0: torch.ones(64)}, site="attention")
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_triton_kernel_without_cuda_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="the Triton mask kernel needs CUDA; use --mask-kernel torch"):
        apply_masks(tiny_llama(), build_masks({0: [1]}, "lesion", 2, WIDTH_LLAMA), kernel="triton")


# -- the untouched guarantee -----------------------------------------------------------------------

NEURONS = {
    "lesion": {"llama": {0: [1, 7, 30], 1: [2, 63]}, "gpt2": {0: [3, 100], 1: [0, 64, 127]}},
    "preserve": {"llama": {0: list(range(0, 64, 9)), 1: [4, 5, 6]}, "gpt2": {0: list(range(0, 128, 11)), 1: [9]}},
}
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}


def train(arch, mode, training, guard=True, steps=3, site="intermediate", neurons=None, restore_every_step=False):
    """A few AdamW steps (lr 1e-2, weight_decay 0.1) with masks, the guard restoring before the "save"
    (or after every step); returns (base state, trained state after merging LoRA, masks)."""
    model = BUILD[arch]()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    width = WIDTH[arch] if site == "intermediate" else HIDDEN
    masks = build_masks(neurons or NEURONS[mode][arch], mode, 2, width)
    if training == "lora":
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    handle = apply_masks(model, masks, site=site, kernel="torch")
    guard_ = protect_masked_weights(model, masks, site=site) if guard else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        loss_of(model, batch(step)).backward()
        optimizer.step()
        if guard_ is not None and restore_every_step:
            guard_.restore()
        optimizer.zero_grad()
    if guard_ is not None:
        drifted = guard_.verify()
        # LoRA slices are zero with zero gradient: AdamW keeps them zero without any restore.
        assert not [name for name in drifted if ".lora_" in name], drifted
        if training == "full" and not restore_every_step:
            assert drifted, "weight decay should have moved the masked slices before restore()"
        guard_.restore()
        assert guard_.verify() == []
    handle.remove()
    if training == "lora":
        model = model.merge_and_unload()
    return base, model.state_dict(), masks


@pytest.mark.parametrize("training", ["full", "lora"])
@pytest.mark.parametrize("mode", ["lesion", "preserve"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_weights_stay_bit_identical(arch, mode, training):
    base, trained, masks = train(arch, mode, training)
    for layer in range(2):
        if layer not in masks:
            continue
        masked = torch.nonzero(masks[layer] == 0).flatten()
        kept = torch.nonzero(masks[layer]).flatten()
        before, after = neuron_slices(base, arch, layer, masked), neuron_slices(trained, arch, layer, masked)
        for part in before:
            if training == "lora" and part == "c_fc bias":
                continue  # LoRA leaves biases alone anyway
            assert torch.equal(before[part], after[part]), f"layer {layer} {part} of masked neurons changed"
        changed = neuron_slices(base, arch, layer, kept), neuron_slices(trained, arch, layer, kept)
        for part in changed[0]:
            if training == "lora" and part == "c_fc bias":
                continue
            assert not torch.equal(changed[0][part], changed[1][part]), (
                f"layer {layer} {part} of kept neurons did not train"
            )


def test_restoring_after_every_step_also_keeps_weights():
    base, trained, masks = train("llama", "lesion", "full", restore_every_step=True)
    masked = torch.nonzero(masks[0] == 0).flatten()
    before, after = neuron_slices(base, "llama", 0, masked), neuron_slices(trained, "llama", 0, masked)
    assert all(torch.equal(before[part], after[part]) for part in before)


@pytest.mark.parametrize("training", ["full", "lora"])
def test_without_the_guard_masked_weights_move(training):
    """The control: masks alone (zero gradient) do not keep weights untouched (decay; LoRA A columns)."""
    base, trained, masks = train("llama", "lesion", training, guard=False)
    masked = torch.nonzero(masks[0] == 0).flatten()
    before, after = neuron_slices(base, "llama", 0, masked), neuron_slices(trained, "llama", 0, masked)
    assert not torch.equal(before["down cols"], after["down cols"])


def test_mlp_output_site_keeps_down_rows_of_masked_channels():
    base, trained, masks = train("llama", "lesion", "full", site="mlp_output", neurons={0: [1, 7], 1: [31]})
    assert list(masks) == [0, 1]
    for layer, mask in masks.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        masked, kept = mask == 0, mask != 0
        assert torch.equal(base[name][masked], trained[name][masked])
        assert not torch.equal(base[name][kept], trained[name][kept])


def test_guard_refuses_dora():
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["down_proj"], use_dora=True))
    with pytest.raises(UsageError, match="use plain LoRA"):
        protect_masked_weights(model, build_masks({0: [1]}, "lesion", 2, WIDTH_LLAMA))


def test_guard_offload_snapshot_restores():
    model = tiny_llama()
    masks = build_masks({0: [1, 2]}, "lesion", 2, WIDTH_LLAMA)
    guard = protect_masked_weights(model, masks, offload=True)
    down = model.model.layers[0].mlp.down_proj.weight
    original = down.detach().clone()
    with torch.no_grad():
        down.mul_(0.5)
    assert guard.verify() == ["model.layers.0.mlp.down_proj.weight"]
    guard.restore()
    assert guard.verify() == [] and torch.equal(down[:, [1, 2]], original[:, [1, 2]])
    assert isinstance(apply_masks(model, masks), MaskHandle)


def test_mlp_discovery_imports_no_masking_machinery():
    """Capture (templates build) finds MLPs through fnscale.models.mlp, without loading masking or the Triton kernels."""
    code = (
        "import sys, fnscale.networks.capture, fnscale.models.mlp; "
        "loaded = sorted(m for m in sys.modules if m.startswith(('fnscale.masking', 'fnscale.kernels'))); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_import_names_still_work():
    import fnscale.masking as masking
    from fnscale.masking import setup
    from fnscale.models import mlp

    assert masking.find_mlp_layers is mlp.find_mlp_layers and masking.unwrap is mlp.unwrap
    assert masking.SITES == mlp.SITES and set(masking.__all__) <= set(dir(masking))
    assert setup.setup_masks.__module__ == "fnscale.masking.setup"
