"""Packed SFT: a packed batch gives the per-example losses and gradients of the unpacked batch (fp32, atol 1e-5),
with and without lesion masks; row packing, token counting, length-grouped batches, and training with --packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from fnscale import data
from fnscale.cli.app import cli
from fnscale.config import TrainConfig
from fnscale.data import packing
from fnscale.errors import UsageError
from fnscale.masking import apply_masks, build_masks
from fnscale.models.mlp import find_mlp_layers
from fnscale.recipes.train import train
from fnscale.runtime.metrics import read_metrics

ATOL = 1e-5  # fp32; observed differences are ~1e-7 (different summation order inside the packed rows)


def random_items(n: int, vocab: int, seed: int) -> list[dict]:
    """Examples of 3..20 tokens; half mask a prompt prefix, half train every token (so boundary labels matter)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(3, 21, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length, (1,), generator=g)) if i % 2 else 0
        items.append({"input_ids": ids, "labels": [data.IGNORE] * cut + ids[cut:]})
    return items


def per_example_losses(
    logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]]
) -> list[torch.Tensor]:
    """Mean next-token NLL of each example, given as (row, start, length) in the batch."""
    out = []
    for row, start, n in spans:
        lg, lb = logits[row, start : start + n - 1], labels[row, start + 1 : start + n]
        out.append(F.cross_entropy(lg, lb, ignore_index=data.IGNORE, reduction="mean"))
    return out


def unpacked_spans(items):
    return [(i, 0, len(it["input_ids"])) for i, it in enumerate(items)]


def packed_spans(rows, n_items, flatten=False):
    spans = [None] * n_items
    offset_rows = 0
    for r, row in enumerate(rows):
        start = 0
        for idx, n in zip(row["examples"], row["lengths"]):
            spans[idx] = (0, offset_rows + start, n) if flatten else (r, start, n)
            start += n
        offset_rows += len(row["input_ids"]) if flatten else 0
    return spans


def forward(model, batch, spans):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), torch.stack(per_example_losses(out.logits.detach(), batch["labels"], spans)), grads


def load(path, attn):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()  # dropout off (GPT-2 has it); gradients still flow


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "lesion"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flat"])
def test_packed_batch_matches_unpacked(request, arch, attn, masked, flatten, tiny_tokenizer):
    model = load(request.getfixturevalue(arch), attn)
    handle = None
    if masked:
        layers = find_mlp_layers(model)
        masks = build_masks({0: [1, 5, 9, 30], 1: [0, 2, 33]}, "lesion", len(layers), layers[0].width)
        handle = apply_masks(model, masks, kernel="torch")
    items = random_items(12, len(tiny_tokenizer), seed=7)
    unpacked = data.collate(items, pad_id=tiny_tokenizer.pad_token_id)
    rows = packing.pack_rows(items, max_len=40)
    assert len(rows) < len(items)  # examples really share rows
    packed = packing.collate_packed(rows, pad_id=tiny_tokenizer.pad_token_id, flatten=flatten)

    loss_u, per_u, grads_u = forward(model, unpacked, unpacked_spans(items))
    loss_p, per_p, grads_p = forward(model, packed, packed_spans(rows, len(items), flatten))
    torch.testing.assert_close(per_p, per_u, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss_p, loss_u, atol=ATOL, rtol=0)  # the same token-weighted mean over the batch
    assert grads_u.keys() == grads_p.keys() and grads_u
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=ATOL, rtol=0, msg=name)
    if handle is not None:
        handle.remove()


def test_without_restarting_positions_examples_leak(tiny_llama, tiny_tokenizer):
    """The check above can fail: the same rows with plain 0..n positions let examples attend to each other."""
    model = load(tiny_llama, "sdpa")
    items = random_items(12, len(tiny_tokenizer), seed=7)
    rows = packing.pack_rows(items, max_len=40)
    packed = packing.collate_packed(rows, pad_id=tiny_tokenizer.pad_token_id)
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    _, per_u, _ = forward(model, data.collate(items, pad_id=tiny_tokenizer.pad_token_id), unpacked_spans(items))
    _, per_leak, _ = forward(model, leaky, packed_spans(rows, len(items)))
    assert (per_leak - per_u).abs().max() > 1e-3


def test_pack_rows_keeps_every_example_once_within_the_limit():
    items = random_items(200, 60, seed=3)
    rows = packing.pack_rows(items, max_len=64)
    assert sorted(i for r in rows for i in r["examples"]) == list(range(200))
    assert all(len(r["input_ids"]) == sum(r["lengths"]) <= 64 for r in rows)
    total = sum(len(i["input_ids"]) for i in items)
    assert len(rows) <= total // 64 + 2  # best-fit decreasing on small items leaves rows nearly full
    assert rows == packing.pack_rows(items, max_len=64)  # deterministic
    for r in rows:
        starts = [sum(r["lengths"][:k]) for k in range(len(r["lengths"]))]
        assert all(r["labels"][s] == data.IGNORE for s in starts)


def test_batch_tokens_counts_real_tokens_only():
    items = random_items(9, 60, seed=5)
    rows = packing.pack_rows(items, max_len=30)
    real = sum(len(i["input_ids"]) for i in items)
    padded = packing.collate_packed(rows, pad_id=0)
    assert padded["input_ids"].numel() > real  # rows of different lengths: there is padding to tell apart
    assert packing.batch_tokens(padded) == real
    assert packing.batch_tokens(packing.collate_packed(rows, pad_id=0, flatten=True)) == real
    assert packing.batch_tokens(data.collate(items, pad_id=0)) == real


def test_length_grouped_sampler_is_seeded_and_groups_lengths():
    lengths = [int(x) for x in torch.randint(2, 200, (400,), generator=torch.Generator().manual_seed(1))]
    sampler = packing.SeededLengthGroupedSampler(4, lengths, seed=11)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and sorted(first) == list(range(400))
    sampler.set_epoch(1)
    assert list(sampler) != first

    def waste(order):  # padding share of batches of 4
        batches = [[lengths[i] for i in order[k : k + 4]] for k in range(0, len(order), 4)]
        return sum(4 * max(b) - sum(b) for b in batches) / sum(lengths)

    random_order = torch.randperm(400, generator=torch.Generator().manual_seed(2)).tolist()
    assert waste(first) < 0.25 * waste(random_order)


def _cfg(model, data_file, out, **kw):
    base = dict(
        model=model,
        dataset=data_file,
        output_dir=str(out),
        max_seq_length=64,
        batch_size=4,
        validation_split=0.0,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_steps=20,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        seed=1,
        lora=False,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("option", ["packing", "group_by_length"])
def test_training_with_packing_or_grouping_lowers_the_loss(tiny_llama, sft_file, tmp_path, option):
    summary = train(_cfg(tiny_llama, sft_file, tmp_path, **{option: True}))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert summary["tokens_per_s"] > 0


def test_impossible_combinations_are_refused(tiny_llama, sft_file, tmp_path):
    with pytest.raises(UsageError, match="drop --group-by-length"):
        train(_cfg(tiny_llama, sft_file, tmp_path, packing=True, group_by_length=True))
    if not torch.cuda.is_available():
        result = CliRunner().invoke(
            cli,
            [
                "train",
                "--model",
                tiny_llama,
                "--dataset",
                sft_file,
                "--output-dir",
                str(tmp_path),
                "--attn-implementation",
                "flash_attention_2",
                "--max-steps",
                "1",
            ],
        )
        assert result.exit_code != 0
        assert "flash_attention_2 needs" in result.output and "Traceback" not in result.output
