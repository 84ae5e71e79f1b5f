"""GPU cluster check: does this machine run fnscale's distributed paths, and how fast/large are they?

Runs `fnscale train` through `accelerate launch` with the shipped launch configs, offline, and reports
per check: status, median step time, tokens/s, peak GPU memory (torch.cuda.max_memory_allocated of the
training process) and final loss.

Checks (1 GPU):
  zero2-masked   DeepSpeed ZeRO-2 (launch_configs/deepspeed_zero2.yaml, --num_processes 1), full fine-tuning
                 with lesion masks from a random template built for the model
  qlora          QLoRA: 4-bit NF4 base + LoRA (launch_configs/single_gpu.yaml)
  qlora-zero3    QLoRA under ZeRO-3 (deepspeed_zero3.yaml), the 4-bit weights partitioned (--with-zero3)

    python benchmarks/gpu_cluster_check.py                       # embedded SmolLM2-135M, offline
    python benchmarks/gpu_cluster_check.py --model /models/llama-3.2-1b --steps 30 --seq 1024
    python benchmarks/gpu_cluster_check.py --smoke               # CPU, tiny random Llama, 2 gloo processes:
                                                                 # checks this script and the configs run

Needs deepspeed and bitsandbytes installed (see docs/cluster.md for bringing wheels to an offline machine).
Writes the report to --out (JSON) and prints a table. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch_configs"


# ---------------------------------------------------------------- worker (inside accelerate launch)


def worker(report: str, argv: list[str]) -> None:
    """fnscale train, recording the peak memory of this process just before the final save (train()'s `save_final`
    seam)."""
    import logging
    import resource

    import torch

    from fnscale.cli.app import train as train_command
    from fnscale.config import TrainConfig
    from fnscale.errors import FnscaleError
    from fnscale.recipes.train import save_final, train

    def measured(accelerator, model, tokenizer, cfg):
        if accelerator.is_main_process:
            peak = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
            if torch.cuda.is_available():
                peak["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                peak["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                peak["gpu"] = torch.cuda.get_device_name()
            Path(report).write_text(json.dumps(peak))
        return save_final(accelerator, model, tokenizer, cfg)

    logging.basicConfig(level=logging.INFO)
    params = train_command.make_context("train", argv[1:]).params  # argv[0] == "train"; the CLI's own flag parsing
    try:
        train(TrainConfig(**{k: v for k, v in params.items() if k != "config_file"}), save_final=measured)
    except FnscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


# ---------------------------------------------------------------- setup


def tiny_model(folder: Path) -> str:
    """A random 4-layer Llama with a word-level tokenizer built in code (for --smoke; no files needed)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fnscale.data import default_dataset_path, load_records

    words = sorted(
        {
            w
            for r in load_records(str(default_dataset_path()))
            for v in r.values()
            if isinstance(v, str)
            for w in v.lower().split()
        }
    )
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + words[:4000])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def random_template(model_path: str, target: Path, share: float = 0.02, seed: int = 0) -> str:
    """A template with one component of `share` of each layer's MLP neurons, shaped for the model."""
    import numpy as np
    from transformers import AutoConfig

    from fnscale.networks.templates import Templates

    cfg = AutoConfig.from_pretrained(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    layers, width = cfg.num_hidden_layers, cfg.intermediate_size
    rng = np.random.default_rng(seed)
    comp = {layer: np.sort(rng.choice(width, max(1, int(share * width)), replace=False)) for layer in range(layers)}
    t = Templates(
        layers=list(range(layers)),
        neurons_per_layer=width,
        components={0: comp},
        model=Path(model_path).name,
        num_layers=layers,
    )
    return str(t.save(target))


# ---------------------------------------------------------------- checks


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_check(name: str, config: str, nproc: int, train_flags: list[str], workdir: Path, timeout: int) -> dict:
    out = workdir / name
    report = workdir / f"{name}.peak.json"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        __file__,
        "--_worker",
        str(report),
        "train",
        *train_flags,
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env.setdefault("OMP_NUM_THREADS", "1" if nproc > 1 else "4")
    start = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    row = {
        "check": name,
        "config": config,
        "processes": nproc,
        "wall_s": round(time.time() - start, 1),
        "ok": res.returncode == 0,
    }
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()
        errors = [line for line in tail if line.startswith("error:") or "Error" in line]
        row["error"] = (errors[-1] if errors else (tail[-1] if tail else f"exit {res.returncode}"))[:400]
        return row
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    timed = steps[2:] or steps  # skip warm-up steps (allocation, JIT)
    row["steps"] = len(steps)
    row["step_time_s"] = round(statistics.median(r["step_time_s"] for r in timed), 4)
    rates = [r["tokens_per_s"] for r in timed if r.get("tokens_per_s")]
    row["tokens_per_s"] = round(statistics.median(rates), 1) if rates else None
    row["final_loss"] = round(steps[-1]["loss"], 4) if steps else None
    if report.is_file():
        row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in json.loads(report.read_text()).items()})
    return row


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="default", help="model folder or hub id (default: the embedded SmolLM2-135M, offline)"
    )
    ap.add_argument("--dataset", default="default", help="SFT data (default: fnscale's bundled sample data)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="--max-seq-length")
    ap.add_argument("--with-zero3", action="store_true", help="also run QLoRA under ZeRO-3")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny random model, 2 gloo processes")
    ap.add_argument("--out", default="gpu_cluster_check.json")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per check")
    args = ap.parse_args()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU node, or use --smoke to check the script on CPU")
    workdir = Path(tempfile.mkdtemp(prefix="fnscale_cluster_check_"))
    model = tiny_model(workdir / "tiny") if args.smoke else args.model
    if model == "default":
        from fnscale.models.loading import resolve_model

        model = resolve_model(None).path  # converts the embedded GGUF once (offline)
    template = random_template(model, workdir / "template.json")
    common = [
        "--model",
        model,
        "--dataset",
        args.dataset,
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-seq-length",
        str(args.seq),
        "--eval-steps",
        "0",
        "--save-steps",
        "0",
        "--validation-split",
        "0",
        "--report-to",
        "none",
        "--logging-steps",
        "1",
    ]
    masked = ["--no-lora", "--mask-mode", "lesion", "--ica-template-path", template, "--ica-component-ids", "0"]
    if args.smoke:  # CPU: 2 processes over gloo, fp32 (4-bit storage must match DeepSpeed's dtype: none on CPU)
        checks = [
            ("zero2-masked", "cpu_2proc_zero2.yaml", 2, masked),
            ("qlora", "cpu_2proc.yaml", 2, ["--load-in-4bit"]),
        ]
        if args.with_zero3:
            checks.append(("qlora-zero3", "cpu_2proc_zero3.yaml", 2, ["--load-in-4bit"]))
    else:
        checks = [
            ("zero2-masked", "deepspeed_zero2.yaml", 1, masked),
            ("qlora", "single_gpu.yaml", 1, ["--load-in-4bit"]),
        ]
        if args.with_zero3:
            checks.append(("qlora-zero3", "deepspeed_zero3.yaml", 1, ["--load-in-4bit"]))
    rows = []
    for name, config, nproc, flags in checks:
        print(f"running {name} ({config}, {nproc} process(es)) ...", flush=True)
        try:
            rows.append(run_check(name, config, nproc, common + flags, workdir, args.timeout))
        except subprocess.TimeoutExpired:
            rows.append({"check": name, "config": config, "ok": False, "error": f"timed out after {args.timeout}s"})
    report = {
        "model": model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq": args.seq,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "checks": rows,
        "workdir": str(workdir),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    mem = "peak_rss_gib" if args.smoke else "peak_gpu_gib"
    print(f"\n{'check':14s} {'ok':4s} {'step s':>8s} {'tok/s':>9s} {mem:>13s} {'loss':>7s} {'wall s':>7s}")
    for r in rows:
        if r["ok"]:
            print(
                f"{r['check']:14s} {'yes':4s} {r['step_time_s']:8.4f} {r['tokens_per_s'] or 0:9.1f} "
                f"{r.get(mem, float('nan')):13.3f} "
                f"{r['final_loss']:7.4f} {r['wall_s']:7.1f}"
            )
        else:
            print(f"{r['check']:14s} {'NO':4s} {r['error']}")
    print(f"\nreport: {args.out}  (run folders: {workdir})")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
