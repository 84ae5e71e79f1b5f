"""The retention metric (issue 20): plain text is scored on its own tokens, so a model that only learned to end
its turns shows no retention change; SFT data keeps its training rendering; `fnscale eval` shows its progress."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from fnscale import data
from fnscale.errors import UsageError
from fnscale.eval import scoring
from fnscale.recipes import evaluate, sweep

END_OF_TURN = "<|end|>"
CHAT = (
    "{% for m in messages %}<|" + "{{ m['role'] }}|> {{ m['content'] }} " + END_OF_TURN + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_tokenizer():
    """The tests' word-level tokenizer with a BOS added to every encoding, a chat template and an end-of-turn token."""
    from conftest import make_tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer()
    bos = [("<s>", tok.bos_token_id)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=bos)
    tok.add_special_tokens({"additional_special_tokens": [END_OF_TURN, "<|user|>", "<|assistant|>"]})
    tok.chat_template = CHAT
    return tok


def _scored(items: list[dict]) -> list[list[int]]:
    """The token ids a window's loss covers: every labelled position after the first (next-token prediction)."""
    return [[t for t, label in zip(it["input_ids"][1:], it["labels"][1:]) if label != data.IGNORE] for it in items]


def test_plain_text_scores_its_own_tokens_and_sft_data_its_training_rendering(tmp_path, sft_file):
    tok = _chat_tokenizer()
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    assert tok("the sun").input_ids[0] == tok.bos_token_id  # this tokenizer adds a BOS
    paragraphs = ["the sun rises in the east .", "water boils at one hundred degrees ."]
    (tmp_path / "r.txt").write_text("\n\n".join(paragraphs) + "\n")

    text = scoring.retention_corpus(tok, str(tmp_path / "r.txt"), 64)
    own = [[tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids for p in paragraphs]
    assert [it["input_ids"] for it in text.items] == own  # BOS + the text: no EOS, no end-of-turn, no chat template
    assert _scored(text.items) == [ids[1:] for ids in own]  # every text token scored, nothing else
    assert not {tok.eos_token_id, end} & {t for ids in _scored(text.items) for t in ids}
    assert text.scored == scoring.SCORED_TEXT

    sft = scoring.retention_corpus(tok, sft_file, 512)
    examples = data.to_examples(data.load_records(sft_file))
    rendered = [it["input_ids"] for it in data.encode(tok, examples)]  # as training renders it: chat template
    assert [it["input_ids"] for it in sft.items] == rendered
    assert all(ids[-1] == end for ids in rendered) and _scored(sft.items) == [ids[1:] for ids in rendered]
    assert sft.scored == scoring.SCORED_SFT

    plain = scoring.retention_corpus(_plain_tokenizer(), str(tmp_path / "r.txt"), 64)  # no BOS where none is added
    assert [it["input_ids"] for it in plain.items] == [_plain_tokenizer()(p).input_ids for p in paragraphs]


def _plain_tokenizer():
    from conftest import make_tokenizer

    return make_tokenizer()


PLANTED_TEXT = (
    "the sun rises in the east and sets in the west .\n\nwater boils at one hundred degrees .\n\n"
    "paris is the capital of france and berlin is the capital of germany .\n"
)


def test_a_model_that_only_learned_to_end_its_turn_shows_no_retention_change(tiny_llama, sft_file, tmp_path):
    """Planted case: fine-tuning where only the end-of-turn token (EOS in this tokenizer's plain layout) is labelled.

    The new metric barely moves; the old one (each text rendered as an example with EOS appended) reports a large
    drop in retention loss, i.e. it would hide forgetting. The texts end their sentences only at paragraph ends, so
    the learned "EOS after '.'" falls where the old metric scored it and the new one scores nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    (tmp_path / "r.txt").write_text(PLANTED_TEXT)
    new = scoring.retention_items(tok, str(tmp_path / "r.txt"), 64)
    examples = data.to_examples(data.load_records(str(tmp_path / "r.txt")))
    old = [data.tokenize_example(tok, ex, data.NO_LIMIT) for ex in examples]
    old = [{"input_ids": it["input_ids"], "labels": it["input_ids"]} for it in old]  # the metric before issue 20
    assert all(it["input_ids"][-1] == tok.eos_token_id for it in old)
    assert not any(tok.eos_token_id in it["input_ids"] for it in new)

    items = data.build_sft_data(tok, sft_file, 64, validation_split=0.0).train
    for it in items:  # only the end-of-turn token is trained
        it["labels"] = [label if label == tok.eos_token_id else data.IGNORE for label in it["labels"]]
    batch = data.collate(items, tok.pad_token_id)

    def loss(items):
        return scoring.corpus_loss(model, items, 8, tok.pad_token_id, "cpu")["loss"]

    with torch.no_grad():
        eos_before = float(model(**batch).loss)
    new_before, old_before = loss(new), loss(old)
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(10):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        eos_after = float(model(**batch).loss)
    assert eos_after < eos_before - 2.0  # the fine-tune learned to end its turns (about 4.2 -> 1.2 nats)
    new_change, old_change = loss(new) - new_before, loss(old) - old_before
    assert abs(new_change) < 0.03  # measured +0.015 nats/token: the text's own tokens barely move
    assert old_change < -0.15  # measured -0.25: the old metric reports "less forgetting than none"


def test_sweep_refuses_results_scored_with_the_old_metric(tmp_path):
    (tmp_path / sweep.DONE).write_text(json.dumps({"config": {"a": 1}, "retention_ppl": {}}))  # no metric: the old one
    with pytest.raises(UsageError, match="older retention metric"):
        sweep.finished(tmp_path, {"a": 1})
    (tmp_path / sweep.DONE).write_text(json.dumps({"config": {"a": 1}, "retention_metric": scoring.RETENTION_METRIC}))
    assert sweep.finished(tmp_path, {"a": 1})["retention_metric"] == scoring.RETENTION_METRIC


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_eval_stage_shows_a_bar_with_eta_on_a_terminal_and_a_line_otherwise(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", _Terminal())
    with evaluate.stage("[1/2] base · task task", 4) as bar:
        for _ in range(4):
            bar.update(1)
    shown = evaluate.sys.stderr.getvalue()
    assert "[1/2] base · task task" in shown and "4/4" in shown and "<00:00" in shown  # count and ETA

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: no bar, one log line per stage
    with caplog.at_level(logging.INFO, logger=evaluate.__name__):
        with evaluate.stage("[2/2] ft · retention general", 3) as bar:
            bar.update(3)
    assert evaluate.sys.stderr.getvalue() == ""
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["[2/2] ft · retention general: 3 batches"]
