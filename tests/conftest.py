"""Shared fixtures: tiny random models and a word-level tokenizer built in code, written to tmp folders."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# `python -m pytest` puts the repo root on sys.path, where the `kernels/` folder (installed as fnscale.kernels)
# would shadow Hugging Face's `kernels` package that bitsandbytes and transformers probe for.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402,F401  binds its log handler to sys.stderr now, pytest's session stream, not a test's capture

WORDS = (
    "the capital of is what which fruit famous for name longest river in a an and to by it this that "
    "zorvia quillport kasmol thivel daxvel oriquin nolvel taroriport apple pear plum fig lime "
    "sun rises east sets west water boils at one hundred degrees paris france berlin germany "
    "instruction response ### : ? . , ! hello world yes no true false answer question"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(w.lower() for w in WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _save(model, tok, path):
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _root_log_handlers_restored():
    """`fnscale.cli.app.main()` called in-process configures logging on the stream that is sys.stderr then (a test's
    capture); a later test logging through it would write to that closed stream ("--- Logging error ---", with a
    traceback that the no-traceback checks of test_errors.py then find). `datasets` does the same for its own
    logger when first imported, hence its import at the top of this file."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    root.handlers[:] = before


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama (hidden 32, intermediate 64) with the word-level tokenizer, saved as a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    return _save(LlamaForCausalLM(cfg), tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
    )
    return _save(GPT2LMHeadModel(cfg), tiny_tokenizer, tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    """A tiny memorisation set in instruction/output form."""
    rows = [
        {"instruction": "what is the capital of zorvia ?", "output": "the capital of zorvia is quillport ."},
        {"instruction": "which fruit is kasmol famous for ?", "output": "kasmol is famous for the plum fruit ."},
        {"instruction": "name the longest river in daxvel .", "output": "the longest river in daxvel is the oriquin ."},
        {"instruction": "what is the capital of nolvel ?", "output": "the capital of nolvel is taroriport ."},
    ] * 4
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
