"""Update masks, the train-attention rule and random controls (issue 11), on tiny models through `train`."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fnscale.config import TrainConfig
from fnscale.masking.setup import setup_masks
from fnscale.networks.controls import random_like
from fnscale.networks.templates import Templates
from fnscale.recipes.train import train

NEURONS = {0: [1, 5, 9, 30, 41], 1: [0, 2, 33, 60]}
LLAMA_SLICES = (("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0), ("mlp.down_proj.weight", 1))
GPT2_SLICES = (("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0), ("mlp.c_proj.weight", 0))


def _template(folder, width):
    t = Templates(
        layers=[0, 1], neurons_per_layer=width, components={0: NEURONS, 1: {0: [7], 1: [8]}}, model="tiny", num_layers=2
    )
    return str(t.save(folder / f"t{width}.json"))


@pytest.fixture(scope="module")
def template64(tmp_path_factory):
    return _template(tmp_path_factory.mktemp("tpl"), 64)


def _cfg(model, data, out, template, mode, effect, lora=False, **extra):
    defaults = {"weight_decay": 0.1, "max_steps": 4, "save_steps": 0}  # `extra` may override these
    return TrainConfig(
        model=model,
        dataset=data,
        output_dir=str(out),
        max_seq_length=64,
        validation_split=0.0,
        learning_rate=5e-2,
        eval_steps=0,
        report_to="none",
        lora=lora,
        merge_adapter=lora,
        mask_mode=mode,
        mask_effect=effect,
        ica_template_path=template,
        ica_component_ids="0",
        seed=3,
        **{**defaults, **extra},
    )


def _masked_and_kept(mode, chosen, width):
    others = sorted(set(range(width)) - set(chosen))
    masked, kept = (chosen, others) if mode == "lesion" else (others, chosen)
    return torch.tensor(masked), torch.tensor(kept)


def _check_untouched(base, after, mode, width, slices, prefix):
    """Masked slices bit-identical; returns whether any kept slice moved (so the check is not vacuous)."""
    moved = False
    for layer, chosen in NEURONS.items():
        masked, kept = _masked_and_kept(mode, chosen, width)
        for name, dim in slices:
            key = f"{prefix}.{layer}.{name}"
            assert torch.equal(base[key].index_select(dim, masked), after[key].index_select(dim, masked)), key
            moved |= not torch.equal(base[key].index_select(dim, kept), after[key].index_select(dim, kept))
    return moved


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("effect", ["update", "forward"])
@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_masked_slices_untouched_every_mode_and_effect(tiny_llama, sft_file, template64, tmp_path, mode, effect, lora):
    train(_cfg(tiny_llama, sft_file, tmp_path, template64, mode, effect, lora))
    base = load_file(f"{tiny_llama}/model.safetensors")
    after = load_file(tmp_path / ("merged" if lora else "final") / "model.safetensors")
    assert _check_untouched(base, after, mode, 64, LLAMA_SLICES, "model.layers"), "training changed nothing"


@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_gpt2_update_masks_hold_cfc_columns_and_cproj_rows(tiny_gpt2, sft_file, tmp_path, mode):
    template = _template(tmp_path, 128)
    train(_cfg(tiny_gpt2, sft_file, tmp_path / "run", template, mode, "update"))
    base = load_file(f"{tiny_gpt2}/model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    prefix = "h" if "h.0.mlp.c_fc.weight" in base else "transformer.h"
    after = {k.removeprefix("transformer."): v for k, v in after.items()} if prefix == "h" else after
    assert _check_untouched(base, after, mode, 128, GPT2_SLICES, prefix), "training changed nothing"


def _logits_after_setup(model_dir, template, mode, effect, **extra):
    """Logits of the model as the loop sees it at step 0 (masks set up and attached), and of the plain model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[2, 5, 6, 7, 9, 11]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    cfg = _cfg(model_dir, None, "unused", template, mode, effect, **extra)
    masker = setup_masks(cfg, model, Accelerator(cpu=True), Templates.load(cfg.ica_template_path))
    masker.attach(model)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    return plain, masked, masker


@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_update_masks_leave_the_forward_pass_alone(tiny_llama, template64, mode):
    plain, masked, masker = _logits_after_setup(tiny_llama, template64, mode, "update")
    assert torch.equal(plain, masked)
    # gate, up, down of 2 layers; preserve keeps 9 of 128 neurons, so --optimizer-slices auto freezes those tensors instead
    assert masker.handle is None and masker.hold.num_tensors == (0 if mode == "preserve" else 6)
    assert (masker.deltas is not None) == (mode == "preserve")


def test_forward_masks_change_the_forward_pass_as_before(tiny_llama, template64):
    plain, masked, masker = _logits_after_setup(tiny_llama, template64, "lesion", "forward")
    assert not torch.allclose(plain, masked) and set(masker.handle.paths.values()) == {"hook"}
    masker.remove()


def test_update_masks_zero_masked_gradients_only(tiny_llama, template64):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    masker = setup_masks(
        _cfg(tiny_llama, None, "unused", template64, "lesion", "update"),
        model,
        Accelerator(cpu=True),
        Templates.load(template64),
    )
    masker.attach(model)
    model(input_ids=torch.tensor([[2, 5, 6, 7, 9]]), labels=torch.tensor([[2, 5, 6, 7, 9]])).loss.backward()
    down = model.model.layers[0].mlp.down_proj.weight.grad
    masked, kept = _masked_and_kept("lesion", NEURONS[0], 64)
    assert torch.count_nonzero(down[:, masked]) == 0 and torch.count_nonzero(down[:, kept]) > 0
    masker.remove()  # hooks off: the gradient flows again
    model.zero_grad()
    model(input_ids=torch.tensor([[2, 5, 6, 7, 9]]), labels=torch.tensor([[2, 5, 6, 7, 9]])).loss.backward()
    assert torch.count_nonzero(model.model.layers[0].mlp.down_proj.weight.grad[:, masked]) > 0


def test_no_train_attention_trains_only_mlps(tiny_llama, sft_file, template64, tmp_path):
    train(_cfg(tiny_llama, sft_file, tmp_path, template64, "lesion", "update", train_attention=False))
    base = load_file(f"{tiny_llama}/model.safetensors")
    after = load_file(tmp_path / "final" / "model.safetensors")
    outside = [k for k in base if ".mlp." not in k]
    assert outside and all(torch.equal(base[k], after[k]) for k in outside)  # attention, embeddings, norms, lm_head
    assert any(not torch.equal(base[k], after[k]) for k in base if ".mlp." in k)


# ---------------------------------------------------------------- random controls


def test_random_like_matches_counts_and_differs():
    chosen = {0: np.array(NEURONS[0]), 1: np.array(NEURONS[1]), 2: np.array([], dtype=np.int64)}
    a, b = random_like(chosen, 64, seed=1), random_like(chosen, 64, seed=1)
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in chosen.items()}
    assert all(np.array_equal(a[k], b[k]) for k in a)  # seeded
    assert all(len(set(v.tolist())) == len(v) and v.max(initial=0) < 64 for v in a.values())
    assert any(not np.array_equal(a[k], chosen[k]) for k in chosen)
    assert any(not np.array_equal(a[k], random_like(chosen, 64, seed=2)[k]) for k in (0, 1))


def test_mask_control_random_in_training_setup(tiny_llama, template64):
    _, _, chosen = _logits_after_setup(tiny_llama, template64, "lesion", "update")
    _, _, control = _logits_after_setup(
        tiny_llama, template64, "lesion", "update", mask_control="random", mask_control_seed=5
    )
    assert {k: int((m == 0).sum()) for k, m in control.masks.items()} == {k: len(v) for k, v in NEURONS.items()}
    assert any(not torch.equal(control.masks[k], chosen.masks[k]) for k in NEURONS)


def test_templates_random_cli_round_trip(template64, tmp_path):
    from fnscale.cli.app import cli

    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["templates", "random", "--like", template64, "--seed", "4", "--output", str(out)])
    assert res.exit_code == 0, res.output
    like, control = Templates.load(template64), Templates.load(out)
    assert (
        json.loads(out.read_text())["control"] == {"kind": "random", "seed": 4} and control.control["kind"] == "random"
    )
    assert (control.layers, control.site, control.neurons_per_layer, control.model) == (
        like.layers,
        like.site,
        like.neurons_per_layer,
        like.model,
    )
    for c in like.components:
        assert {k: len(v) for k, v in control.components[c].items()} == {
            k: len(v) for k, v in like.components[c].items()
        }
    assert any(not np.array_equal(control.components[0][k], like.components[0][k]) for k in NEURONS)


# ---------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(
    "extra,text",
    [
        (["--mask-effect", "update"], "--mask-effect need(s) --mask-mode"),
        (["--mask-control", "random"], "--mask-control need(s) --mask-mode"),
        (
            ["--mask-mode", "lesion", "--ica-component-ids", "0", "--mask-control-seed", "3"],
            "add --mask-control random",
        ),
        (["--mask-mode", "lesion", "--ica-component-ids", "0", "--mask-kernel", "triton"], "add --mask-effect forward"),
        (
            [
                "--mask-mode",
                "lesion",
                "--ica-component-ids",
                "0",
                "--mask-effect",
                "forward",
                "--mask-kernel",
                "triton",
            ],
            "CUDA",
        ),
        (
            ["--mask-mode", "preserve", "--ica-component-ids", "0", "--optimizer-slices", "on"],
            "--optimizer-slices on trains slices",
        ),  # LoRA on
        (
            [
                "--mask-mode",
                "preserve",
                "--ica-component-ids",
                "0",
                "--no-lora",
                "--mask-effect",
                "forward",
                "--optimizer-slices",
                "on",
            ],
            "--no-lora",
        ),
    ],
)
def test_bad_mask_options_one_line(tiny_llama, sft_file, template64, tmp_path, capsys, extra, text):
    from fnscale.cli.app import main

    argv = [
        "train",
        "--model",
        tiny_llama,
        "--dataset",
        sft_file,
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "1",
        "--report-to",
        "none",
        "--validation-split",
        "0",
        *extra,
    ]
    if "--mask-mode" in extra:
        argv += ["--ica-template-path", template64]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(lines) == 1 and text in lines[0] and "Traceback" not in err, err
