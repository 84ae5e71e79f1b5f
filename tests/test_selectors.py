"""Selectors (activation, Fisher, random) against plain reference computations, and key-network ranking on a model with
a planted component that matters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fnscale import data
from fnscale.cli.app import cli
from fnscale.config import TrainConfig
from fnscale.errors import UsageError
from fnscale.networks import selectors
from fnscale.networks.controls import random_like
from fnscale.networks.keys import rank_components
from fnscale.networks.templates import Templates
from fnscale.preflight import check_mask_options, parse_component_ids

WIDTH = 64  # tiny_llama: 2 layers x 64 intermediate neurons, hidden 32


def _like(width=WIDTH, **kw) -> Templates:
    """Three components on layers 0 and 1 of a tiny model, of different sizes per layer (1 and 2 overlap on layer 1)."""
    comps = {0: {0: [1, 2, 3], 1: [4]}, 1: {0: [10, 11, 12, 13], 1: [20, 21, 22, 23]}, 2: {1: [22, 23, 30]}}
    return Templates(layers=[0, 1], neurons_per_layer=width, components=comps, num_layers=2, **kw)


def _model_and_batches(path, source, batch_size=3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items, _, _ = data.sample_items(tok, [source], 100, 64, 0)
    return (
        model,
        items,
        [data.collate(items[i : i + batch_size], tok.pad_token_id) for i in range(0, len(items), batch_size)],
    )


def _cli(*argv):
    res = CliRunner().invoke(cli, [str(a) for a in argv])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def varied_sft(tmp_path_factory):
    """Examples of different lengths, so batches are padded."""
    rows = [
        {"instruction": "what is the capital of zorvia ?", "output": "quillport ."},
        {
            "instruction": "which fruit is kasmol famous for ?",
            "output": "kasmol is famous for the plum fruit and the fig .",
        },
        {"instruction": "name the longest river in daxvel .", "output": "the oriquin ."},
        {"instruction": "hello", "output": "hello world , the sun rises in the east and sets in the west ."},
        {"instruction": "what is the capital of nolvel ?", "output": "the capital of nolvel is taroriport ."},
    ]
    path = tmp_path_factory.mktemp("varied") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- counts and choices


def test_layer_counts_follow_the_chosen_components_or_a_share():
    like = _like()
    assert selectors.layer_counts(like) == {0: 7, 1: 6}  # the union: layer 1 holds 4, 20-23 and 30 (22 and 23 twice)
    assert selectors.layer_counts(like, [1, 2]) == {0: 4, 1: 5}
    assert selectors.layer_counts(like, [2]) == {0: 0, 1: 3}
    assert selectors.layer_counts(like, share=0.1) == {0: 6, 1: 6}  # round(6.4)
    with pytest.raises(UsageError, match="drop --ica-component-ids"):
        selectors.layer_counts(like, [0], share=0.1)
    with pytest.raises(UsageError, match="between 0 and 1"):
        selectors.layer_counts(like, share=1.5)
    with pytest.raises(UsageError, match="selects no neuron"):
        selectors.layer_counts(like, share=0.001)


def test_top_neurons_takes_the_highest_scores_and_breaks_ties_by_index():
    scores = {0: np.array([0.5, 3.0, 1.0, 3.0, 2.0]), 1: np.array([1.0, 1.0, 1.0, 0.0, 1.0])}
    out = selectors.top_neurons(scores, {0: 3, 1: 2})
    assert out[0].tolist() == [1, 3, 4] and out[1].tolist() == [0, 1]
    assert selectors.top_neurons(scores, {0: 0})[0].tolist() == []


def test_random_selection_is_the_training_control_draw_seeded_and_size_matched():
    like = _like()
    counts = selectors.layer_counts(like, [1, 2])
    a = selectors.random_neurons(counts, WIDTH, seed=7)
    assert {layer: v.size for layer, v in a.items()} == counts
    assert all(np.unique(v).size == v.size and v.min() >= 0 and v.max() < WIDTH for v in a.values() if v.size)
    same = random_like(
        like.component_neurons([1, 2]), WIDTH, 7
    )  # what `train --mask-control random --mask-control-seed 7` masks
    assert all(np.array_equal(a[layer], same[layer]) for layer in counts)
    assert all(np.array_equal(a[layer], selectors.random_neurons(counts, WIDTH, seed=7)[layer]) for layer in counts)
    other = selectors.random_neurons(counts, WIDTH, seed=8)
    assert any(not np.array_equal(a[layer], other[layer]) for layer in counts)


# ---------------------------------------------------------------- scores against references


def _reference_activation(model, items, site):
    """Mean |activation| per neuron: one unpadded example at a time, summing over all tokens."""
    blocks = model.model.layers
    sums, tokens, store = {}, 0, {}
    hooks = []
    for i, block in enumerate(blocks):
        if site == "intermediate":
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(i, a[0])))
        else:
            hooks.append(block.mlp.register_forward_hook(lambda m, a, out, i=i: store.__setitem__(i, out)))
    with torch.no_grad():
        for it in items:
            model(input_ids=torch.tensor([it["input_ids"]]))
            for i, act in store.items():
                sums[i] = sums.get(i, 0) + act[0].abs().double().sum(0)
            tokens += len(it["input_ids"])
    for h in hooks:
        h.remove()
    return {i: (s / tokens).numpy() for i, s in sums.items()}


def _reference_fisher(model, items):
    """Per example, unpadded: a gate of ones on each down projection's input, autograd of the summed NLL over the
    labelled tokens, squared; the mean over examples."""
    blocks = model.model.layers
    sums = {i: torch.zeros(WIDTH, dtype=torch.float64) for i in range(len(blocks))}
    for it in items:
        gates = {i: torch.ones(WIDTH, requires_grad=True) for i in range(len(blocks))}
        hooks = [
            b.mlp.down_proj.register_forward_pre_hook(lambda m, a, g=gates[i]: (a[0] * g,))
            for i, b in enumerate(blocks)
        ]
        logits = model(input_ids=torch.tensor([it["input_ids"]])).logits[0]
        loss = torch.zeros(())
        for t in range(len(it["labels"]) - 1):
            if it["labels"][t + 1] != data.IGNORE:
                loss = loss - torch.log_softmax(logits[t], -1)[it["labels"][t + 1]]
        grads = torch.autograd.grad(loss, [gates[i] for i in range(len(blocks))])
        for h in hooks:
            h.remove()
        for i, g in enumerate(grads):
            sums[i] += g.double() ** 2
    return {i: (s / len(items)).numpy() for i, s in sums.items()}


@pytest.mark.parametrize("site", ["intermediate", "mlp_output"])
def test_activation_scores_match_a_per_example_reference(tiny_llama, varied_sft, site):
    model, items, batches = _model_and_batches(tiny_llama, varied_sft)
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding is there and must not count
    got = selectors.activation_scores(model, batches, site, [0, 1], "cpu")
    want = _reference_activation(model, items, site)
    for layer in (0, 1):
        assert got[layer].shape == (WIDTH if site == "intermediate" else 32,)
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-5, atol=1e-7)


def test_fisher_scores_match_autograd_one_example_at_a_time(tiny_llama, varied_sft):
    model, items, batches = _model_and_batches(tiny_llama, varied_sft)
    assert any(label == data.IGNORE for it in items for label in it["labels"])  # prompts carry no loss
    got = selectors.fisher_scores(model, batches, "intermediate", [0, 1], "cpu")
    want = _reference_fisher(model, items)
    for layer in (0, 1):
        assert want[layer].max() > 0
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-4, atol=1e-12 * want[layer].max())
    assert not any(p.grad is not None for p in model.parameters())  # only the gates get gradients


# ---------------------------------------------------------------- the select command


def test_select_writes_size_matched_networks_files_deterministically(tmp_path, tiny_llama, varied_sft):
    like_path = _like(model=tiny_llama).save(tmp_path / "T.json")
    model, _, batches = _model_and_batches(tiny_llama, varied_sft, batch_size=8)
    outs = {}
    for by in ("activation", "fisher", "random"):
        for run in (1, 2):
            out = tmp_path / f"{by}{run}.json"
            code, text = _cli(
                "templates",
                "select",
                "--by",
                by,
                "--like",
                like_path,
                "--data",
                varied_sft,
                "--ica-component-ids",
                "1,2",
                "--seed",
                3,
                "--batch-size",
                8,
                "--output",
                out,
            )
            assert code == 0, text
            outs[by, run] = out
        assert outs[by, 1].read_text() == outs[by, 2].read_text()  # the same seed and data give the same file
        sel = Templates.load(outs[by, 1])
        assert sel.component_ids == [0] and sel.site == "intermediate" and sel.layers == [0, 1]
        assert {layer: v.size for layer, v in sel.components[0].items()} == {1: 5, 0: 4}
        assert sel.selection["by"] == by and sel.selection["seed"] == 3 and sel.selection["counts"] == {"0": 4, "1": 5}
    act = Templates.load(outs["activation", 1])
    scores = selectors.activation_scores(model, batches, "intermediate", [0, 1], "cpu")
    assert all(
        np.array_equal(act.components[0][layer], selectors.top_neurons(scores, {0: 4, 1: 5})[layer]) for layer in (0, 1)
    )
    assert act.selection["data"] == [varied_sft] and act.selection["examples"] == {varied_sft: 5}
    fisher = Templates.load(outs["fisher", 1])
    assert any(not np.array_equal(fisher.components[0][layer], act.components[0][layer]) for layer in (0, 1))
    code, text = _cli(
        "templates",
        "select",
        "--by",
        "random",
        "--like",
        like_path,
        "--ica-component-ids",
        "1,2",
        "--seed",
        4,
        "--output",
        tmp_path / "r4.json",
    )
    assert code == 0, text
    r3, r4 = Templates.load(outs["random", 1]).components[0], Templates.load(tmp_path / "r4.json").components[0]
    assert any(not np.array_equal(r3[layer], r4[layer]) for layer in (0, 1))  # another seed, another draw
    code, text = _cli(
        "templates", "select", "--by", "random", "--like", like_path, "--share", 0.25, "--output", tmp_path / "s.json"
    )
    assert code == 0 and {layer: v.size for layer, v in Templates.load(tmp_path / "s.json").components[0].items()} == {
        0: 16,
        1: 16,
    }
    code, text = _cli(
        "templates", "select", "--by", "fisher", "--like", like_path, "--output", tmp_path / "x.json", "--share", 2
    )
    assert code == 2 and text.strip().splitlines()[-1].startswith("error: --share 2.0 must be between 0 and 1")
    code, text = _cli("templates", "show", outs["fisher", 1])
    assert code == 0 and "selection: by fisher" in text


# ---------------------------------------------------------------- key networks


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_llama, varied_sft):
    """tiny_llama taught the data through component 1's neurons only: their gate/up rows and down columns are trained
    (the rest frozen, the LM head scaled up so logits can be confident), so lesioning them costs what was learnt."""
    model, _, batches = _model_and_batches(tiny_llama, varied_sft, batch_size=8)
    like = _like()
    with torch.no_grad():
        model.lm_head.weight *= 20
    params, keep = [], []
    for layer in (0, 1):
        mlp = model.model.layers[layer].mlp
        rows = torch.zeros(WIDTH, dtype=torch.bool)
        rows[torch.as_tensor(like.components[1][layer])] = True
        params += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        keep += [rows[:, None], rows[:, None], rows[None, :]]
    for p in model.parameters():
        p.requires_grad_(p is not None and any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=0.05)
    model.train()
    for _ in range(60):
        for b in batches:
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            for p, k in zip(params, keep):
                p.grad *= k
            opt.step()
            opt.zero_grad()
    path = tmp_path_factory.mktemp("planted")
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return str(path)


def test_rank_puts_the_planted_component_first_and_records_the_ranking(tmp_path, planted, varied_sft):
    path = _like(model=planted).save(tmp_path / "T.json")
    with pytest.raises(UsageError, match="needs a ranked networks file"):
        parse_component_ids("top:1", Templates.load(path))
    code, text = _cli("templates", "rank", path, "--data", varied_sft, "--random-draws", 3, "--seed", 1)
    assert code == 0, text
    ranked = Templates.load(path)
    rows = ranked.ranking["components"]
    assert [r["id"] for r in rows][0] == 1 and sorted(r["id"] for r in rows) == [0, 1, 2]
    first = rows[0]
    assert first["rise"] > 1.0 and first["ratio"] > 5 and first["neurons"] == 8
    assert all(r["rise"] < first["rise"] / 5 for r in rows[1:])  # component 2 shares two of its neurons
    assert ranked.ranking["random_draws"] == 3 and ranked.ranking["data"] == [varied_sft]
    assert parse_component_ids("top:1", ranked) == [1] and parse_component_ids("top:3", ranked)[0] == 1
    with pytest.raises(UsageError, match="ranks 3 components"):
        parse_component_ids("top:4", ranked)
    assert check_mask_options(
        TrainConfig(mask_mode="lesion", ica_template_path=str(path), ica_component_ids="top:2")
    ).ranking
    with pytest.raises(UsageError, match="needs a ranked networks file"):  # templates computed in the run are unranked
        check_mask_options(TrainConfig(mask_mode="lesion", ica_component_ids="top:2"))
    code, text = _cli("templates", "show", path)
    table = text[text.index("key networks") :].splitlines()
    assert (
        code == 0
        and table[1].split()[:2] == ["rank", "comp"]
        and [line.split()[1] for line in table[2:5]] == ["1", "2", "0"]
    )
    # the K most important set the counts of a selection
    code, text = _cli(
        "templates",
        "select",
        "--by",
        "random",
        "--like",
        path,
        "--ica-component-ids",
        "top:1",
        "--output",
        tmp_path / "s.json",
    )
    assert code == 0 and Templates.load(tmp_path / "s.json").selection["counts"] == {"0": 4, "1": 4}


def test_rank_components_against_manual_lesions(planted, varied_sft):
    """The recorded losses are those of forward masks applied by hand (zeroed down-projection inputs)."""
    model, _, batches = _model_and_batches(planted, varied_sft)
    like = _like()
    ranking = rank_components(model, batches, like, [0, 2], draws=2, seed=5, device="cpu", progress=False)

    def loss_with(zeroed):
        hooks = []
        for layer, idx in zeroed.items():
            keep = torch.ones(WIDTH)
            keep[torch.as_tensor(idx, dtype=torch.long)] = 0
            hooks.append(
                model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda m, a, k=keep: (a[0] * k,))
            )
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                target = b["labels"][:, 1:]
                keep_t = target != data.IGNORE
                total += float(torch.nn.functional.cross_entropy(logits[keep_t], target[keep_t], reduction="sum"))
                count += int(keep_t.sum())
        for h in hooks:
            h.remove()
        return total / count

    base = loss_with({})
    assert ranking["base_loss"] == pytest.approx(base, rel=1e-5)
    for row in ranking["components"]:
        assert row["loss"] == pytest.approx(loss_with(like.component_neurons([row["id"]])), rel=1e-5)
    again = rank_components(model, batches, like, [0, 2], draws=2, seed=5, device="cpu", progress=False)
    assert again == ranking  # seeded draws
