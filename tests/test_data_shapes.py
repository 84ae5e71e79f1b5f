"""Data as users bring it: every shape, multi-turn supervision, sources, weighted mixing, the map cache, `data show`."""

import copy
import gzip
import json

import pandas as pd
import pytest

from fnscale import data
from fnscale.data import mixing, schemas, tokenize
from fnscale.errors import UsageError
from fnscale.runtime import trackers

CHAT = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)

# One row per shape (a few words from the tiny tokenizer's vocabulary), and the user turn / response it must give.
ROWS = {
    "chat": (
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
        "hello",
        "world",
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]},
        "hello",
        "world",
    ),
    "system-user-assistant": ({"system": "yes", "user": "hello", "assistant": "world"}, "hello", "world"),
    "dolly": (
        {"instruction": "name it", "context": "the sun", "response": "paris", "category": "qa"},
        "name it\n\nthe sun",
        "paris",
    ),
    "instruction-response": ({"instruction": "name it", "response": "paris"}, "name it", "paris"),
    "alpaca": ({"instruction": "name it", "input": "the sun", "output": "paris"}, "name it\n\nthe sun", "paris"),
    "context-question-answer": (
        {"context": "the sun", "question": "what ?", "answer": "east"},
        "the sun\n\nwhat ?",
        "east",
    ),
    "qa": ({"question": "what ?", "answer": "east"}, "what ?", "east"),
    "question-response": ({"question": "what ?", "response": "east"}, "what ?", "east"),
    "prompt-completion": ({"prompt": "the sun", "completion": "rises"}, "the sun", "rises"),
    "prompt-response": ({"prompt": "the sun", "response": "rises"}, "the sun", "rises"),
    "input-output": ({"input": "the sun", "output": "rises"}, "the sun", "rises"),
    "camel": ({"message_1": "the sun", "message_2": "rises"}, "the sun", "rises"),
    "text": ({"text": "the sun rises"}, None, "the sun rises"),
}


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


@pytest.fixture
def chat_tok(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # the fixture is session-wide: change a copy
    tok.chat_template = CHAT
    return tok


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Each test gets its own datasets cache, so cache hits come only from the test itself."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_every_shape_is_detected_and_mapped(tmp_path):
    assert set(ROWS) == set(schemas.BY_NAME), "a shape without a test row"
    for name, (row, user, response) in ROWS.items():
        recs = data.load_records(write_jsonl(tmp_path / f"{name}.jsonl", [row] * 3))
        assert data.detect_schema(recs[0].keys()) == name
        ex = data.to_examples(recs, name)[0]  # --schema NAME accepts the same data
        if user is None:
            assert ex.messages is None and ex.text == response
            continue
        assert [m["content"] for m in ex.messages if m["role"] == "user"] == [user]
        assert ex.messages[-1] == {"role": "assistant", "content": response}


def test_system_column_becomes_system_message():
    ex = data.to_examples([ROWS["system-user-assistant"][0]])[0]
    assert ex.messages[0] == {"role": "system", "content": "yes"}


def test_unknown_shape_lists_columns_and_accepted_shapes():
    with pytest.raises(UsageError) as err:
        data.to_examples([{"foo": 1, "bar": 2}])
    msg = str(err.value)
    assert (
        "\n" not in msg and "['bar', 'foo']" in msg and "instruction/context/response" in msg and "conversations" in msg
    )


def test_named_schema_must_fit():
    with pytest.raises(UsageError, match=r"--schema dolly needs columns \['instruction', 'context', 'response'\]"):
        data.to_examples([{"instruction": "a", "response": "b"}], "dolly")


def test_prompt_columns_join_into_the_user_turn():
    ex = data.to_examples(
        [{"q": "name it", "ctx": "the sun", "a": "paris"}], prompt_column="q,ctx", response_column="a"
    )[0]
    assert ex.messages == [{"role": "user", "content": "name it\n\nthe sun"}, {"role": "assistant", "content": "paris"}]


# ---------------------------------------------------------------- multi-turn supervision

CONVO = [
    {"role": "system", "content": "yes"},
    {"role": "user", "content": "what is the capital of zorvia ?"},
    {"role": "assistant", "content": "quillport ."},
    {"role": "user", "content": "and of nolvel ?"},
    {"role": "assistant", "content": "taroriport ."},
]


def _reference(tok, messages):
    """Plain reference: the template puts `<s> role : content </s>` per message; assistant content + `</s>` is trained."""
    ids, labels = [], []
    for m in messages:
        head = tok(f"<s> {m['role']} :", add_special_tokens=False).input_ids
        body = tok(f"{m['content']} </s>", add_special_tokens=False).input_ids
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return ids, labels


def test_every_assistant_turn_is_trained_with_its_end_of_turn(chat_tok):
    item = data.tokenize_example(chat_tok, data.Example(CONVO), 512)
    ids, labels = _reference(chat_tok, CONVO)
    assert item["input_ids"] == ids and item["labels"] == labels
    trained = chat_tok.decode([x for x in item["labels"] if x != data.IGNORE])
    assert trained.split() == "quillport . </s> taroriport . </s>".split()
    assert "yes" in chat_tok.decode(item["input_ids"][:6])  # the system turn is kept (masked)


def test_train_on_inputs_trains_every_token(chat_tok):
    item = data.tokenize_example(chat_tok, data.Example(CONVO), 512, train_on_inputs=True)
    assert item["labels"] == item["input_ids"] == _reference(chat_tok, CONVO)[0]


def test_plain_template_trains_each_response_and_eos(tiny_tokenizer):
    item = data.tokenize_example(tiny_tokenizer, data.Example(CONVO), 512)
    runs, run = [], []
    for x in item["labels"] + [data.IGNORE]:
        if x == data.IGNORE and run:
            runs.append(tiny_tokenizer.decode(run).split())
            run = []
        elif x != data.IGNORE:
            run.append(x)
    assert runs == [["quillport", ".", "</s>"], ["taroriport", ".", "</s>"]]


def test_truncation_keeps_the_last_turn(chat_tok):
    item = data.tokenize_example(chat_tok, data.Example(CONVO), 12)
    assert len(item["input_ids"]) == 12
    assert chat_tok.decode([x for x in item["labels"] if x != data.IGNORE]).split()[-3:] == ["taroriport", ".", "</s>"]


# ---------------------------------------------------------------- sources


def test_spec_convention():
    assert data.parse_spec("gsm8k:main:train") == data.DatasetSpec(
        "gsm8k", "main", "train", 1.0, label="gsm8k:main:train"
    )
    spec = data.parse_spec("old.jsonl:0.2")
    assert (spec.path, spec.weight, spec.name) == ("old.jsonl", 0.2, "old.jsonl")
    assert (
        data.parse_spec("squad::validation:3").split == "validation"
        and data.parse_spec("squad::validation:3").config is None
    )
    with pytest.raises(UsageError, match="local data takes only a weight"):
        data.parse_spec("old.jsonl:main")
    with pytest.raises(UsageError, match="must be positive"):
        data.parse_spec("old.jsonl:0")


def test_folders_globs_and_gzip(tmp_path):
    rows = [{"question": "what ?", "answer": str(i)} for i in range(6)]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", rows[:2])
    write_jsonl(shards / "b.jsonl.gz", rows[2:4], gz=True)
    write_jsonl(shards / "c.jsonl", rows[4:])
    assert sorted(r["answer"] for r in data.load_records(str(shards))) == [str(i) for i in range(6)]
    assert len(data.load_records(str(shards / "*.jsonl"))) == 4
    assert len(data.load_records(str(shards / "b.jsonl.gz"))) == 2
    pq = tmp_path / "pq"
    pq.mkdir()
    for i in range(2):
        pd.DataFrame(rows[3 * i : 3 * i + 3]).to_parquet(pq / f"part-{i}.parquet")
    assert len(data.load_records(str(pq))) == 6
    with pytest.raises(UsageError, match="no files match"):
        data.load_records(str(tmp_path / "*.csv"))


def test_offline_hub_name_with_config_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="cannot load dataset 'nobody/no-such-set'.*offline") as err:
        data.build_sft_data(None, "nobody/no-such-set:main:test", 64)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- mixing


def _pair(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "what ?", "answer": "east"}] * 40)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "the sun", "completion": "rises"}] * 20)
    return a, b


def test_weighted_mix_counts_and_reproducibility(tmp_path, tiny_tokenizer):
    a, b = _pair(tmp_path)
    sft = data.build_sft_data(tiny_tokenizer, [a, f"{b}:0.25"], 64, validation_split=0.1, seed=3)
    assert sft.counts == {a: 36, b: 4} and sft.validation_counts == {
        a: 4,
        b: 2,
    }  # 0.25 x the 18 left after holding out 2 -> 4
    assert len(sft.train) == 40 and sft.schema == "qa,prompt-completion"
    again = data.build_sft_data(tiny_tokenizer, [a, f"{b}:0.25"], 64, validation_split=0.1, seed=3)
    assert again.train == sft.train and again.validation == sft.validation
    other = data.build_sft_data(tiny_tokenizer, [a, f"{b}:0.25"], 64, validation_split=0.1, seed=4)
    assert other.train != sft.train  # the interleaving follows the seed
    up = data.build_sft_data(tiny_tokenizer, [a, f"{b}:2.5"], 64, validation_split=0.0)
    assert up.counts == {a: 40, b: 50}


def test_weighted_indices_are_exact():
    idx = list(range(10))
    assert mixing.weighted(idx, 1.0, 0) == idx
    assert len(mixing.weighted(idx, 0.3, 0)) == 3 and len(set(mixing.weighted(idx, 0.3, 0))) == 3
    assert sorted(mixing.weighted(idx, 2.0, 0)) == sorted(idx * 2)
    assert mixing.weighted(idx, 0.01, 0) and len(mixing.weighted(idx, 0.01, 0)) == 1


def test_yaml_list_with_per_dataset_schema_and_columns(tmp_path, tiny_tokenizer):
    a, _ = _pair(tmp_path)
    c = write_jsonl(tmp_path / "c.jsonl", [{"q": "what ?", "a": "west", "text": "unused"}] * 10)
    lst = tmp_path / "mix.yaml"
    lst.write_text(f"- {a}\n- path: {c}\n  weight: 0.5\n  columns: {{prompt: q, response: a}}\n")
    sft = data.build_sft_data(tiny_tokenizer, str(lst), 64, validation_split=0.0)
    assert sft.counts == {a: 40, c: 5} and "custom" in sft.schema
    west = [it for it in sft.train if tiny_tokenizer.convert_tokens_to_ids("west") in it["labels"]]
    assert len(west) == 5


def test_templates_samples_per_dataset(tmp_path, tiny_tokenizer):
    a, b = _pair(tmp_path)
    ids, tokens, examples = data.sample_token_ids(tiny_tokenizer, [a, {"path": b, "samples": 3}], 7, 64, seed=1)
    assert examples == {a: 7, b: 3} and len(ids) == 10
    assert tokens[a] == sum(len(i) for i in ids[:7]) and tokens[b] == sum(len(i) for i in ids[7:])


# ---------------------------------------------------------------- the datasets.map cache


def test_second_run_reuses_the_tokenisation_cache(tmp_path, chat_tok, monkeypatch):
    a, _ = _pair(tmp_path)
    calls = []
    real = tokenize.encode
    monkeypatch.setattr(tokenize, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = data.build_sft_data(chat_tok, a, 64, validation_split=0.0)
    n_first = len(calls)
    assert n_first > 0
    second = data.build_sft_data(chat_tok, a, 64, validation_split=0.0)
    assert len(calls) == n_first and second.train == first.train  # read from the Arrow cache, not re-tokenised
    data.build_sft_data(chat_tok, a, 64, validation_split=0.0, train_on_inputs=True)
    assert len(calls) > n_first  # other options: a new cache entry
    n = len(calls)
    other = copy.deepcopy(chat_tok)
    other.chat_template = CHAT.replace("<s> ", "<s>  ")
    data.build_sft_data(other, a, 64, validation_split=0.0)
    assert len(calls) > n  # another chat template: re-tokenised
    ds, _ = mixing.tokenized(chat_tok, data.parse_spec(a), mixing.DataOptions())
    assert ds.cache_files and all(str(tmp_path / "hf_cache") in f["filename"] for f in ds.cache_files)


# ---------------------------------------------------------------- data show, trackers


def test_data_show_json(tmp_path, chat_tok, capsys):
    from transformers import LlamaConfig

    from fnscale.cli.app import main

    model = tmp_path / "tok"
    chat_tok.save_pretrained(model)
    LlamaConfig(
        vocab_size=len(chat_tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(model)
    convo = write_jsonl(tmp_path / "convo.jsonl", [{"messages": CONVO}] * 4)
    a, _ = _pair(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["data", "show", convo, f"{a}:0.5", "--model", str(model), "-n", "2", "--json", "--max-seq-length", "20"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert [(d["schema"], d["examples"], d["weight"]) for d in report["datasets"]] == [
        ("chat", 4, 1.0),
        ("qa", 40, 0.5),
    ]
    ex = report["examples"][0]
    full, labels = _reference(chat_tok, CONVO)
    assert report["tokens"]["max"] == len(full) and report["tokens"]["over_max_seq_length"] == 4
    # truncation keeps the last response and cuts the prompt from the left: the last 20 tokens of the reference
    assert ex["tokens"] == 20 and ex["trained_tokens"] == sum(label != -100 for label in labels[-20:]) == 6
    assert ex["text"].endswith("[[taroriport . </s>]]")
    assert report["padding"]["batch_size"] == 4 and 0 < report["padding"]["real_share"] <= 1


def test_padding_share_bounds_what_packing_can_gain():
    from fnscale.data.preview import padding

    assert padding([10] * 8, 512, 4) == {"batch_size": 4, "real_share": 1.0, "packing_gain_bound": 1.0}
    two = padding([10, 30], 512, 2)  # one batch padded to 30: 40 real of 60
    assert two["real_share"] == pytest.approx(40 / 60, abs=1e-3) and two["packing_gain_bound"] == 1.5
    assert padding([10, 600], 100, 2)["real_share"] == pytest.approx(
        110 / 200, abs=1e-3
    )  # truncated at --max-seq-length
    # batches of 1 never pad; a shuffle changes which examples share a batch, never the totals
    assert padding([3, 50, 7, 90, 12], 512, 1)["real_share"] == 1.0


def test_data_show_unknown_shape_is_one_line(tmp_path):
    import subprocess
    import sys

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    res = subprocess.run(
        [sys.executable, "-m", "fnscale", "data", "show", bad, "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error:")


def test_report_to_several_trackers(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("wandb", "mlflow") else real(n, *a))
    with pytest.raises(UsageError, match="pip install wandb"):
        trackers.parse("tensorboard,wandb")
    with pytest.raises(UsageError, match="pip install mlflow"):
        trackers.parse(["mlflow"])
    with pytest.raises(UsageError, match="unknown --report-to comet"):
        trackers.parse("comet")
    assert trackers.log_with("none", tmp_path) is None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n in ("wandb", "mlflow") else real(n, *a)
    )
    with_ = trackers.log_with("tensorboard, wandb,mlflow", tmp_path)
    assert type(with_[0]).__name__ == "TensorBoardTracker" and with_[1:] == ["wandb", "mlflow"]


def test_train_with_a_replay_mix_reports_examples_per_dataset(tiny_llama, sft_file, tmp_path):
    from fnscale.config import TrainConfig
    from fnscale.recipes.train import train
    from fnscale.runtime.metrics import read_metrics

    _, old = _pair(tmp_path)
    cfg = TrainConfig(
        model=tiny_llama,
        dataset=(sft_file, f"{old}:0.5"),
        output_dir=str(tmp_path / "out"),
        max_seq_length=64,
        validation_split=0.0,
        max_steps=2,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        train_on_inputs=True,
    )
    summary = train(cfg)
    assert summary["examples"] == {sft_file: 16, old: 10}
    assert {"step": 0, "examples": {sft_file: 16, old: 10}} in read_metrics(tmp_path / "out" / "metrics.jsonl")
