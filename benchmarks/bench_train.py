"""Training throughput: trained (response) tokens per second for fnscale unpacked, fnscale --packing, and TRL's
SFTTrainer.

Same model (the embedded SmolLM2-135M-Instruct, or a tiny random Llama with --tiny), same short synthetic
instruction/response examples rendered with the model's chat template, LoRA r=16 (alpha 32, dropout 0.05) on
all linear layers, batch 4, 128 tokens, fp32, CPU, AdamW at the same learning rate, one run each.

Each configuration runs in a fresh process with the same thread count. A forward pre-hook on the model records
the time each micro-batch starts and its trained tokens (labels[:, 1:] != -100, the positions the loss scores);
throughput is trained tokens / seconds over the steps after --warmup, so loading, tokenisation and the first
steps do not count. Ratios are against fnscale unpacked. TRL runs when it is installed (`pip install trl`; it is
not a dependency of fnscale).

    python benchmarks/bench_train.py [--tiny] [--lengths short|mixed] [--steps 12] [--warmup 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the sun rises in the east and sets in the west water boils at one hundred degrees paris is the capital "
    "of france berlin of germany rivers flow to the sea"
).split()
CONFIGS = ("fnscale unpacked", "fnscale --packing", "TRL SFTTrainer")
BATCH, SEQ, LORA_R, LORA_ALPHA, LORA_DROPOUT, LR = 4, 128, 16, 32, 0.05, 2e-4
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def answer_words(rng: random.Random, lengths: str) -> int:
    """short: 3-20 words, so every example is about as long as the next. mixed: long-tailed like real instruction
    data (most answers a few words, one in four a paragraph), so one long answer sets each padded batch's width."""
    if lengths == "short":
        return rng.randint(3, 20)
    return rng.randint(40, 70) if rng.random() < 0.25 else rng.randint(1, 8)


def write_data(folder: Path, rows: int, lengths: str = "short") -> tuple[Path, Path]:
    """SFT examples (a 4-16 word question, an answer as `answer_words` draws it), as alpaca rows for fnscale and as
    conversational prompt/completion rows for TRL: both render them with the tokenizer's chat template."""
    rng = random.Random(0)
    pairs = [
        (
            " ".join(rng.choices(WORDS, k=rng.randint(4, 16))) + " ?",
            " ".join(rng.choices(WORDS, k=answer_words(rng, lengths))) + " .",
        )
        for _ in range(rows)
    ]
    ours, trl = folder / "alpaca.jsonl", folder / "conversational.jsonl"
    ours.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))
    trl.write_text(
        "".join(
            json.dumps(
                {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            )
            + "\n"
            for q, a in pairs
        )
    )
    return ours, trl


def tiny_model(folder: Path) -> str:
    """A 4-layer random Llama with the tests' word-level tokenizer and a small chat template (smoke runs only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
        "{% if add_generation_prompt %}<s> assistant :{% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


class Meter:
    """Start time and trained tokens of every micro-batch, read from the model's forward arguments."""

    def __init__(self):
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def hook(self, module, args, kwargs):
        labels = kwargs.get("labels")
        self.starts.append(time.perf_counter())
        self.tokens.append(int((labels[:, 1:] != -100).sum()) if labels is not None else 0)

    def result(self, warmup: int) -> dict:
        """Tokens/s over micro-batches warmup .. n-2 (the last one's end is not observed)."""
        n = len(self.starts)
        if n < warmup + 2:
            raise SystemExit(f"only {n} micro-batches ran; raise --steps")
        seconds = self.starts[-1] - self.starts[warmup]
        tokens = sum(self.tokens[warmup:-1])
        return {
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "steps": n - 1 - warmup,
            "trained_tokens": tokens,
            "tokens_per_step": tokens / (n - 1 - warmup),
        }


def run_fnscale(model: str, data: Path, out: Path, steps: int, packing: bool, meter: Meter) -> None:
    from fnscale.config import TrainConfig
    from fnscale.recipes.train import build_model, train

    def build_and_hook(cfg, accelerator):
        source, tokenizer, m = build_model(cfg, accelerator)
        m.register_forward_pre_hook(meter.hook, with_kwargs=True)
        return source, tokenizer, m

    cfg = TrainConfig(
        model=model,
        dataset=(str(data),),
        output_dir=str(out),
        max_seq_length=SEQ,
        batch_size=BATCH,
        validation_split=0.0,
        lora=True,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        lora_target_modules=",".join(LINEAR),
        learning_rate=LR,
        max_steps=steps,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        dtype="float32",
        packing=packing,
        schema="alpaca",
    )
    train(cfg, build_model=build_and_hook, save_final=lambda *a, **k: {})


def run_trl(model: str, data: Path, out: Path, steps: int, meter: Meter) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("json", data_files=str(data), split="train")
    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_length=SEQ,
        max_steps=steps,
        learning_rate=LR,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        packing=False,
        bf16=False,
        fp16=False,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=42,
        dataloader_num_workers=0,
    )
    peft = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=LINEAR, task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=m, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
    trainer.model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer.train()


def child(name: str, model: str, data: Path, steps: int, warmup: int) -> None:
    """One configuration in this process; prints its result as one JSON line."""
    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        if name == "TRL SFTTrainer":
            run_trl(model, data, Path(out), steps, meter)
        else:
            run_fnscale(model, data, Path(out), steps, name.endswith("--packing"), meter)
    print("RESULT " + json.dumps({"name": name, **meter.result(warmup)}), flush=True)


def run_child(name: str, model: str, data: Path, args) -> dict | None:
    """One configuration in a fresh process with the same threads; None (and a line on stderr) if it failed."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--model",
        model,
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        print(f"{name}: failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def table(results: list[dict]) -> str:
    base = next((r["tokens_per_s"] for r in results if r["name"] == "fnscale unpacked"), None)
    rows = [
        "| configuration | trained tokens/s | trained tokens/step | timed steps | vs fnscale unpacked |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        rows.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['tokens_per_step']:.1f} | {r['steps']} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M (smoke run)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=2000, help="examples in the synthetic data set")
    p.add_argument(
        "--lengths",
        choices=["short", "mixed"],
        default="short",
        help="answer lengths: short (3-20 words, all alike) or mixed (long-tailed: mostly 1-8 words, a quarter 40-70)",
    )
    p.add_argument("--child"), p.add_argument("--model"), p.add_argument("--data")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.model, Path(args.data), args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        ours, trl = write_data(Path(tmp), args.rows, args.lengths)
        if args.tiny:
            model = tiny_model(Path(tmp) / "tiny")
        else:
            from fnscale.models.loading import resolve_model

            model = str(resolve_model(None).path)
        names = [n for n in CONFIGS if n != "TRL SFTTrainer" or _has_trl()]
        results = [
            r for r in (run_child(n, model, trl if n.startswith("TRL") else ours, args) for n in names) if r is not None
        ]
    print(
        f"model {'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct'}, LoRA r={LORA_R} on "
        f"{','.join(LINEAR)}, batch {BATCH}, "
        f"{SEQ} tokens, {args.lengths} answers, fp32, CPU, {args.threads} threads, {args.steps} steps ({args.warmup} "
        "untimed)"
    )
    print(table(results))
    if not _has_trl():
        print("TRL not installed: `pip install trl` to add it")


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    main()
