"""Tokenisation through `datasets.map` with its cache: 200k short synthetic SFT examples, first run vs cached run.

Each run is a fresh process (so the cached run gets no help from Python-level state), timed around
`fnscale.data.build_sft_data`; peak RSS is the process's maximum resident set size. The data, a temporary
datasets cache and a word-level tokenizer with a chat template are written to a temporary folder.

    python benchmarks/bench_tokenize.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the sun rises in the east and sets in the west water boils at one hundred degrees".split()
CHAT = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def write_data(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(rows):
            q = " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            fh.write(json.dumps({"instruction": q, "output": a}) + "\n")


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *sorted(set(WORDS)), "user", "assistant", ":"])
    }
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT
    tok.save_pretrained(path)


def one_run(folder: Path) -> None:
    """Child process: build the SFT data once and print time and peak RSS as JSON."""
    from transformers import AutoTokenizer

    from fnscale import data

    tok = AutoTokenizer.from_pretrained(folder / "tok")
    t0 = time.perf_counter()
    sft = data.build_sft_data(tok, str(folder / "data.jsonl"), 512, validation_split=0.01)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"seconds": seconds, "peak_rss_mb": peak_mb, "train": len(sft.train), "validation": len(sft.validation)}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_run(Path(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(folder / "data.jsonl", args.rows)
        write_tokenizer(folder / "tok")
        env = {
            **os.environ,
            "HF_DATASETS_CACHE": str(folder / "cache"),
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        results = {}
        for label in ("first run", "cached run"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(folder)], env=env, capture_output=True, text=True, check=True
            )
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{args.rows} examples ({results['first run']['train']} train, {results['first run']['validation']} held "
            "out), "
            f"{os.cpu_count()} CPUs visible"
        )
        for label, r in results.items():
            print(f"  {label:10s}  {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB")
        print(f"  cached / first time: {results['cached run']['seconds'] / results['first run']['seconds']:.3f}")


if __name__ == "__main__":
    main()
