"""Data formats, schema detection, loss masks, truncation, splits, collation."""

import json

import pandas as pd
import pytest

from fnscale import data
from fnscale.errors import UsageError

ROWS = [
    {"instruction": "what is the capital of zorvia ?", "input": "", "output": "the capital of zorvia is quillport ."}
] * 3


def write(tmp_path, name, rows):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        p.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(p, index=False)
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(p)
    return str(p)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_formats_load_the_same_records(tmp_path, name):
    recs = data.load_records(write(tmp_path, name, ROWS))
    assert len(recs) == 3
    assert recs[0]["output"] == ROWS[0]["output"]


@pytest.mark.parametrize(
    "row, schema",
    [
        ({"instruction": "a", "input": "b", "output": "c"}, "alpaca"),
        ({"prompt": "a", "completion": "c"}, "prompt-completion"),
        ({"question": "a", "answer": "c"}, "qa"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}, "chat"),
        ({"text": "a c"}, "text"),
    ],
)
def test_schema_detection(row, schema):
    assert data.detect_schema(row.keys()) == schema
    ex = data.to_examples([row])[0]
    assert (ex.text if ex.messages is None else ex.messages[-1]["content"]) in ("c", "a c")


def test_schema_override_and_custom_columns():
    rows = [{"q": "hello", "a": "world", "text": "x"}]
    assert data.to_examples(rows, "text")[0].messages is None
    ex = data.to_examples(rows, prompt_column="q", response_column="a")[0]
    assert ex.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


def test_csv_without_usable_columns_names_what_it_found(tmp_path):
    path = write(tmp_path, "bad.csv", [{"foo": 1, "bar": 2}])
    with pytest.raises(UsageError, match=r"found \['bar', 'foo'\].*expected one of"):
        data.to_examples(data.load_records(path))


def test_malformed_jsonl_reports_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UsageError, match="line 2"):
        data.load_records(str(p))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        data.load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty"):
        data.load_records(str(tmp_path / "empty.jsonl"))


def test_prompt_is_masked_and_eos_trained(tiny_tokenizer):
    ex = data.to_examples(ROWS)[0]
    t = data.tokenize_example(tiny_tokenizer, ex, 256)
    labels, ids = t["labels"], t["input_ids"]
    n_prompt = sum(1 for x in labels if x == data.IGNORE)
    prompt_ids = tiny_tokenizer(
        data.render_prompt(tiny_tokenizer, ex.messages[:-1]), add_special_tokens=False
    ).input_ids
    assert n_prompt >= len(prompt_ids)
    assert all(x == data.IGNORE for x in labels[:n_prompt]) and all(x != data.IGNORE for x in labels[n_prompt:])
    assert labels[-1] == tiny_tokenizer.eos_token_id == ids[-1]
    trained = tiny_tokenizer.decode(labels[n_prompt:-1])
    assert trained.split() == ex.messages[-1]["content"].split()


def test_chat_template_is_used_when_present(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)  # the fixture is session-wide: change a copy
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} answer :{% endif %}"
    text = data.render_prompt(tok, [{"role": "user", "content": "hello"}])
    assert text == "<s> hello </s> answer :"
    assert data.render_prompt(tok, [{"role": "user", "content": "hello"}], template="plain").startswith(
        "### Instruction:"
    )


def test_truncation_keeps_the_response(tiny_tokenizer):
    ex = data.Example(
        [{"role": "user", "content": "the " * 100}, {"role": "assistant", "content": "quillport is the capital ."}]
    )
    t = data.tokenize_example(tiny_tokenizer, ex, 24)
    assert len(t["input_ids"]) == 24
    r = tiny_tokenizer("quillport is the capital .", add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
    assert t["input_ids"][-len(r) :] == r and t["labels"][-len(r) :] == r


def test_max_seq_length_too_small_is_refused(tiny_tokenizer):
    with pytest.raises(UsageError, match="too small"):
        data.tokenize_all(tiny_tokenizer, data.to_examples(ROWS), 2)


def test_validation_split_is_seeded_and_disjoint():
    items = list(range(100))
    tr, va = data.split_validation(items, 0.1, seed=3)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == items
    assert data.split_validation(items, 0.1, seed=3) == (tr, va)
    assert data.split_validation(items, 0.0, seed=3) == (items, [])


def test_padding_never_counts_in_loss():
    batch = data.collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0
    )
    assert batch["labels"][1].tolist() == [5, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0]


def test_collate_pads_like_transformers_seq2seq_collator(tiny_tokenizer):
    """The reference: transformers' DataCollatorForSeq2Seq (pads ids with the pad token, labels with -100)."""
    import random

    import torch
    from transformers import DataCollatorForSeq2Seq

    rng = random.Random(0)
    batch = [
        {"input_ids": [rng.randrange(3, 20) for _ in range(n)], "labels": [rng.choice([-100, 7]) for _ in range(n)]}
        for n in (5, 1, 9, 3)
    ]
    want = DataCollatorForSeq2Seq(tiny_tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")(
        batch
    )
    got = data.collate(batch, tiny_tokenizer.pad_token_id)
    assert set(got) == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_default_dataset_is_bundled():
    recs = data.load_records(None)
    assert len(recs) >= 32 and data.detect_schema(recs[0].keys()) == "alpaca"


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="cannot load dataset 'nobody/no-such-dataset'.*local"):
        data.load_records("nobody/no-such-dataset")
