"""Write a tiny random Llama with a word-level tokenizer to FOLDER: a model the wheel check trains in seconds.

Its vocabulary is the words of the bundled sample data that the installed fnscale trains on by default.
Usage: python tiny_model.py FOLDER
"""

import json
import re
import sys
from importlib.resources import files

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

data = files("fnscale.sample_data")
text = data.joinpath("retention.txt").read_text(encoding="utf-8")
for line in data.joinpath("default_sft.jsonl").read_text(encoding="utf-8").splitlines():
    text += " " + " ".join(str(v) for v in json.loads(line).values())
words = sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))
specials = ["<pad>", "<unk>", "<s>", "</s>"]
tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
tk.normalizer = normalizers.Lowercase()
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(
    tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
)
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=len(tok),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
