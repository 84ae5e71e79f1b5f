"""GPU check: does this machine run fnscale's GPU and distributed paths, and how fast/large are they?

Runs each check in its own process (`fnscale train` through this script's worker, plain or under `accelerate launch`
with the shipped launch configs; `fnscale templates` as a subprocess), offline, and prints one row per check:
status and figures. Checks (1 GPU; issue 20's items in brackets):

  zero2-masked        DeepSpeed ZeRO-2 full fine-tuning with lesion masks from a random template built for the model
  qlora               QLoRA: 4-bit NF4 base + LoRA (launch_configs/single_gpu.yaml)
  qlora-zero3         QLoRA under ZeRO-3, the 4-bit weights partitioned (with --with-zero3 or --only)
  networks-in-run     --mask-mode lesion --ica-components 4: networks computed inside the GPU run [1]
  fp16-overflow       --precision fp16-mixed full fine-tuning with a non-finite forward injected at step 3: the run
                      finishes, the step is skipped (GradScaler) and logged, and the later steps train [2]
  bf16-moves-weights  full fine-tuning at lr 2e-5: the default precision (bf16-mixed, fp32 master weights) moves the
                      weights measurably; --precision bf16-true (bf16 weights) reported beside it [5]
  cuml-pca            `templates build --pca-backend cuml` vs `--pca-backend torch`: best-match IoU of the templates
                      (`templates compare`); skipped when cuML does not import [6]
  step-time           median step time and tokens/s of LoRA and full fine-tuning, logging every step vs every 50
                      steps: the cost of the host syncs a log line makes [8]

    python benchmarks/gpu_cluster_check.py                       # embedded SmolLM2-135M, offline (~8 min on 1 GPU)
    python benchmarks/gpu_cluster_check.py --model FOLDER --random-init   # FOLDER's architecture, random weights
    python benchmarks/gpu_cluster_check.py --only fp16-overflow,step-time
    python benchmarks/gpu_cluster_check.py --smoke               # CPU, tiny random Llama: checks this script runs

--smoke runs every check that can run on the CPU in its CPU form (2 gloo processes for the distributed ones, fp32
in place of fp16, numpy in place of cuML) and says so in the status. Rows whose package is missing (deepspeed,
bitsandbytes, cuML) are skipped with that reason. Writes the report to --out (JSON); exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch_configs"
CHECKS = (
    "zero2-masked",
    "qlora",
    "qlora-zero3",
    "networks-in-run",
    "fp16-overflow",
    "bf16-moves-weights",
    "cuml-pca",
    "step-time",
)
NAN_FORWARD_ENV = "GPUCHECK_NAN_FORWARD"  # the worker makes this training forward (1-based) return NaN logits
NAN_AT = 3
WEIGHT = "model.layers.0.mlp.down_proj.weight"  # the tensor compared before/after training in bf16-moves-weights
MOVED_ENOUGH = 0.5  # share of its entries the default precision must change at lr 2e-5
IOU_AGREE = 0.8  # mean best-match IoU at which the cuML and torch templates agree


# ---------------------------------------------------------------- worker (a training process)


def worker(report: str, argv: list[str]) -> None:
    """fnscale train, recording the run's precision and the peak memory of this process just before the final save
    (train()'s `save_final` seam); NaN logits at one training forward when NAN_FORWARD_ENV is set (`build_model`)."""
    import logging
    import resource

    import torch

    from fnscale.cli.app import train as train_command
    from fnscale.config import TrainConfig
    from fnscale.errors import FnscaleError
    from fnscale.recipes.train import build_model, precision, save_final, train

    def measured(accelerator, model, tokenizer, cfg):
        if accelerator.is_main_process:
            weights = next(accelerator.unwrap_model(model).parameters()).dtype
            peak = {
                "precision": precision(cfg, accelerator.device.type).name,
                "weights_dtype": str(weights).removeprefix("torch."),
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
            if torch.cuda.is_available():
                peak["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                peak["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                peak["gpu"] = torch.cuda.get_device_name()
            Path(report).write_text(json.dumps(peak))
        return save_final(accelerator, model, tokenizer, cfg)

    def poisoned(cfg, accelerator):
        source, tokenizer, model = build_model(cfg, accelerator)
        poison_forward(model, int(os.environ[NAN_FORWARD_ENV]))
        return source, tokenizer, model

    logging.basicConfig(level=logging.INFO)
    params = train_command.make_context("train", argv[1:]).params  # argv[0] == "train"; the CLI's own flag parsing
    cfg = TrainConfig(**{f.name: params[f.name] for f in dataclasses.fields(TrainConfig) if f.name in params})
    build = poisoned if os.environ.get(NAN_FORWARD_ENV) else build_model
    try:
        train(cfg, build_model=build, save_final=measured)
    except FnscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def poison_forward(model, n: int) -> None:
    """The n-th training forward returns NaN logits: the non-finite loss an fp16 overflow gives."""
    count = {"n": 0}

    def hook(module, args, kwargs, output):
        if module.training:
            count["n"] += 1
            if count["n"] == n:
                output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------- setup


def random_model(folder: Path, like: str | None = None) -> str:
    """Random weights saved in `folder`: `like`'s architecture and tokenizer, or (None) a 4-layer Llama with a
    word-level tokenizer built in code (for --smoke; no files needed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    if like is not None:
        tok = AutoTokenizer.from_pretrained(like)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    else:
        tok, model = _tiny_llama()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _tiny_llama():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fnscale.data import default_dataset_path, load_records

    records = load_records(str(default_dataset_path()))
    words = sorted({w for r in records for v in r.values() if isinstance(v, str) for w in v.lower().split()})
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + words[:4000])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
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
    return tok, LlamaForCausalLM(cfg)


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_tensor(folder: Path, name: str):
    """One tensor of a saved model (any of its safetensors shards), as fp32 on the CPU, with its stored dtype."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                t = f.get_tensor(name)
                return t.float(), t.dtype
    raise KeyError(f"{name} not in {folder}")


# ---------------------------------------------------------------- running fnscale


@dataclass
class Run:
    """One finished process: its exit, output, and (for training) metrics.jsonl and the worker's report."""

    ok: bool
    wall_s: float
    output: str
    out: Path
    report: dict = field(default_factory=dict)

    @property
    def error(self) -> str:
        lines = self.output.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        return (errors[-1] if errors else (lines[-1] if lines else "failed"))[:300]

    @property
    def tail(self) -> list[str]:
        """The output's last lines (kept in the JSON report of a failed check)."""
        return self.output.strip().splitlines()[-25:]

    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def steps(self) -> list[dict]:
        return [r for r in self.records() if "step_time_s" in r]

    def record(self, key: str):
        """The first metrics.jsonl value of `key`, or None."""
        return next((r[key] for r in self.records() if key in r), None)


@dataclass
class Checker:
    """What every check shares: options, the model, the common train flags, the run folder."""

    args: argparse.Namespace
    model: str
    workdir: Path
    cuda: bool
    common: list[str]

    @property
    def smoke(self) -> bool:
        return self.args.smoke

    def sh(self, cmd: list[str], out: Path, env: dict | None = None) -> Run:
        offline = os.environ.get("HF_HUB_OFFLINE", "1")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": offline, **(env or {})}
        start = time.time()
        try:
            # cwd outside the checkout: its kernels/ folder would shadow Hugging Face's `kernels` package
            res = subprocess.run(
                cmd, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=self.args.timeout
            )
            ok, output = res.returncode == 0, res.stdout + res.stderr
        except subprocess.TimeoutExpired:
            ok, output = False, f"error: timed out after {self.args.timeout} s"
        return Run(ok, round(time.time() - start, 1), output, out)

    def train(
        self, name: str, flags: list[str], config: str | None = None, nproc: int = 1, env: dict | None = None
    ) -> Run:
        """`fnscale train` (this script's worker) with the common flags and `flags`: a plain process, or under
        `accelerate launch --config_file launch_configs/<config>`."""
        out, report = self.workdir / name, self.workdir / f"{name}.report.json"
        launcher = [sys.executable]
        if config is not None:
            launcher += ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
            launcher += ["--num_processes", str(nproc), "--main_process_port", str(free_port())]
        cmd = [*launcher, __file__, "--_worker", str(report), "train", *self.common, *flags, "--output-dir", str(out)]
        threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if nproc > 1 else "4")}
        run = self.sh(cmd, out, {**threads, **(env or {})})
        if run.ok and report.is_file():
            run.report = json.loads(report.read_text())
        return run

    def templates_build(self, backend: str) -> Run:
        out = self.workdir / f"templates-{backend}"
        cmd = [sys.executable, "-m", "fnscale", "templates", "build", "--model", self.model, "--dataset"]
        cmd += [self.args.dataset, "--samples-per-dataset", "32", "--components", "4", "--pca-backend", backend]
        cmd += ["--max-seq-length", str(self.args.seq), "--seed", "0", "--output", str(out)]
        return self.sh(cmd, out)

    def timing(self, run: Run, every: int = 1) -> dict:
        """Median step time and tokens/s over the logged windows, skipping the warm-up (the first 2 steps or the
        first window)."""
        steps = run.steps()
        timed = (steps[2:] if every == 1 else steps[1:]) or steps
        rates = [r["tokens_per_s"] for r in timed if r.get("tokens_per_s")]
        return {
            "steps": steps[-1]["step"] if steps else 0,
            "step_time_s": statistics.median(r["step_time_s"] for r in timed) if timed else math.nan,
            "tokens_per_s": statistics.median(rates) if rates else math.nan,
            "final_loss": steps[-1]["loss"] if steps else math.nan,
        }

    def speed_row(self, name: str, run: Run) -> dict:
        """The row of a training check that only has to run: step time, tokens/s, peak memory, final loss."""
        if not run.ok:
            return failed(name, run)
        t = self.timing(run)
        mem_key = "peak_gpu_gib" if self.cuda else "peak_rss_gib"
        mem = run.report.get(mem_key, math.nan)
        figures = (
            f"{t['step_time_s']:.4f} s/step, {t['tokens_per_s']:.0f} tok/s, {mem_key} {mem:.3f}, "
            f"loss {t['final_loss']:.4f}, {run.wall_s:.0f} s"
        )
        return row(name, "ok", figures, wall_s=run.wall_s, **t, **run.report)


def row(check: str, status: str, figures: str, **data) -> dict:
    return {"check": check, "status": status, "figures": figures, **data}


def failed(check: str, run: Run, what: str = "") -> dict:
    return row(check, "FAIL", f"{what}{run.error}", wall_s=run.wall_s, tail=run.tail)


def missing(*modules: str) -> dict | None:
    """None when every module imports, else the reason to skip a row."""
    gone = [m for m in modules if find_spec(m) is None]
    return {"status": f"skipped ({', '.join(gone)} not installed)"} if gone else None


# ---------------------------------------------------------------- checks


def check_zero2_masked(c: Checker) -> dict:
    template = random_template(c.model, c.workdir / "template.json")
    masked = ["--no-lora", "--mask-mode", "lesion", "--ica-template-path", template, "--ica-component-ids", "0"]
    config, nproc = ("cpu_2proc_zero2.yaml", 2) if c.smoke else ("deepspeed_zero2.yaml", 1)
    return c.speed_row("zero2-masked", c.train("zero2-masked", masked, config, nproc))


def check_qlora(c: Checker) -> dict:
    config, nproc = ("cpu_2proc.yaml", 2) if c.smoke else ("single_gpu.yaml", 1)
    return c.speed_row("qlora", c.train("qlora", ["--load-in-4bit"], config, nproc))


def check_qlora_zero3(c: Checker) -> dict:
    config, nproc = ("cpu_2proc_zero3.yaml", 2) if c.smoke else ("deepspeed_zero3.yaml", 1)
    return c.speed_row("qlora-zero3", c.train("qlora-zero3", ["--load-in-4bit"], config, nproc))


def check_networks_in_run(c: Checker) -> dict:
    flags = ["--no-lora", "--mask-mode", "lesion", "--ica-components", "4", "--ica-samples", "32"]
    flags += ["--ica-component-ids", "0,1"]
    run = c.train("networks-in-run", flags)
    result = c.speed_row("networks-in-run", run)
    if run.ok:
        masked = run.record("masked_neurons/total")
        saved = (run.out / "templates").is_dir()
        result["figures"] = (
            f"4 networks computed in the run (saved: {saved}), {masked} neurons masked; " + result["figures"]
        )
        if not masked or not saved:
            result["status"] = "FAIL"
    return result


def check_fp16_overflow(c: Checker) -> dict:
    prec = "fp16-mixed" if c.cuda else "fp32"  # fp16 needs CUDA; on the CPU the skip path runs without a GradScaler
    run = c.train("fp16-overflow", ["--no-lora", "--precision", prec], env={NAN_FORWARD_ENV: str(NAN_AT)})
    if not run.ok:
        return failed("fp16-overflow", run)
    skipped = len(re.findall(r"step skipped", run.output))
    losses = [r["loss"] for r in run.steps()]
    t = c.timing(run)
    trained = t["steps"] == c.args.steps and all(math.isfinite(x) for x in losses)
    good = skipped >= 1 and trained
    status = ("ok" if good else "FAIL") + ("" if c.cuda else " (CPU: fp32, no GradScaler)")
    figures = (
        f"{prec}, NaN forward at step {NAN_AT}: {skipped} step(s) skipped (log), {t['steps']}/{c.args.steps} steps "
        f"applied, loss {losses[0] if losses else math.nan:.3f} -> {t['final_loss']:.3f}, all finite: {trained}"
    )
    return row("fp16-overflow", status, figures, skipped=skipped, losses=losses, wall_s=run.wall_s)


def check_bf16_moves_weights(c: Checker) -> dict:
    before, _ = read_tensor(Path(c.model), WEIGHT)
    moved, parts = {}, []
    for label, extra in (("default", []), ("bf16-true", ["--precision", "bf16-true"])):
        run = c.train(f"bf16-{label}", ["--no-lora", "--learning-rate", "2e-5", *extra])
        if not run.ok:
            return failed("bf16-moves-weights", run, f"{label}: ")
        after, dtype = read_tensor(run.out / "final", WEIGHT)
        base = before.to(dtype).float()  # the starting point as that run held it
        share = float((after != base).float().mean())
        rel = float((after - base).norm() / base.norm())
        moved[label] = {"share_moved": share, "rel_change": rel, **run.report}
        held = str(dtype).removeprefix("torch.")
        parts.append(f"{label} ({run.report.get('precision')}, {held}): {share:.1%} moved, |dW|/|W| {rel:.1e}")
    status = "ok" if moved["default"]["share_moved"] >= MOVED_ENOUGH else "FAIL"
    return row("bf16-moves-weights", status, f"lr 2e-5, {WEIGHT}: " + "; ".join(parts), **moved)


def check_cuml_pca(c: Checker) -> dict:
    has_cuml = find_spec("cuml") is not None and c.cuda
    if not has_cuml and not c.smoke:
        return row("cuml-pca", "skipped (cuML not installed)", "")
    first = "cuml" if has_cuml else "numpy"  # --smoke without cuML: the same path with numpy in its place
    runs = {backend: c.templates_build(backend) for backend in (first, "torch")}
    for backend, run in runs.items():
        if not run.ok:
            return failed("cuml-pca", run, f"{backend}: ")
    paths = [str(run.out / "global_templates.json") for run in runs.values()]
    cmp = c.sh([sys.executable, "-m", "fnscale", "templates", "compare", *paths], c.workdir)
    found = re.search(r"mean IoU of \d+ matched components: ([0-9.]+)", cmp.output)
    if not cmp.ok or not found:
        return failed("cuml-pca", cmp, "templates compare: ")
    iou = float(found.group(1))
    status = ("ok" if iou >= IOU_AGREE else "FAIL") + ("" if has_cuml else " (numpy in place of cuML)")
    builds = ", ".join(f"{b} {r.wall_s:.0f} s" for b, r in runs.items())
    return row("cuml-pca", status, f"{first} vs torch: mean best-match IoU {iou:.3f}; build {builds}", iou=iou)


def check_step_time(c: Checker) -> dict:
    steps, every = (10, 5) if c.smoke else (c.args.step_time_steps, 50)
    figures, data = [], {}
    for kind, flags in (("lora", []), ("full", ["--no-lora"])):
        parts = []
        for interval in (1, every):
            name = f"step-time-{kind}-log{interval}"
            run = c.train(name, [*flags, "--max-steps", str(steps), "--logging-steps", str(interval)])
            if not run.ok:
                return failed("step-time", run, f"{name}: ")
            data[name] = t = c.timing(run, interval)
            parts.append(f"{t['step_time_s'] * 1000:.1f} ms {t['tokens_per_s']:.0f} tok/s")
        figures.append(f"{kind}: " + " vs ".join(parts))
    return row("step-time", "ok", f"log every step vs every {every}: " + "; ".join(figures), **data)


RUNNERS = {
    "zero2-masked": (check_zero2_masked, ("deepspeed",)),
    "qlora": (check_qlora, ("bitsandbytes",)),
    "qlora-zero3": (check_qlora_zero3, ("deepspeed", "bitsandbytes")),
    "networks-in-run": (check_networks_in_run, ()),
    "fp16-overflow": (check_fp16_overflow, ()),
    "bf16-moves-weights": (check_bf16_moves_weights, ()),
    "cuml-pca": (check_cuml_pca, ()),
    "step-time": (check_step_time, ()),
}


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="default", help="model folder or hub id (default: the embedded SmolLM2-135M, offline)"
    )
    ap.add_argument(
        "--random-init", action="store_true", help="--model's architecture and tokenizer with random weights"
    )
    ap.add_argument("--dataset", default="default", help="SFT data (default: fnscale's bundled sample data)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-time-steps", type=int, default=100, help="steps of each step-time run (logged every 50)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="--max-seq-length")
    ap.add_argument("--only", default="", help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    ap.add_argument("--with-zero3", action="store_true", help="also run QLoRA under ZeRO-3")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny random model, 2 gloo processes")
    ap.add_argument("--out", default="gpu_cluster_check.json")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process")
    args = ap.parse_args()
    unknown = [n for n in args.only.split(",") if n and n not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {', '.join(unknown)}; use {', '.join(CHECKS)}")
    return args


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    args = parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not args.smoke and not cuda:
        sys.exit("no CUDA device: run this on a GPU node, or use --smoke to check the script on CPU")
    workdir = Path(tempfile.mkdtemp(prefix="fnscale_gpu_check_"))
    model = args.model
    if model == "default" and not args.smoke:
        from fnscale.models.loading import resolve_model

        model = str(resolve_model(None).path)  # converts the embedded GGUF once (offline)
    if args.smoke or args.random_init:
        model = random_model(workdir / "model", None if args.smoke else model)
    common = ["--model", model, "--dataset", args.dataset, "--max-steps", str(args.steps)]
    common += ["--batch-size", str(args.batch_size), "--max-seq-length", str(args.seq), "--eval-steps", "0"]
    common += ["--save-steps", "0", "--validation-split", "0", "--report-to", "none", "--logging-steps", "1"]
    checker = Checker(args, model, workdir, cuda, common)

    names = [n for n in args.only.split(",") if n] or [n for n in CHECKS if n != "qlora-zero3" or args.with_zero3]
    rows = []
    for name in names:
        check, needs = RUNNERS[name]
        print(f"running {name} ...", flush=True)
        skip = missing(*needs)
        rows.append(row(name, skip["status"], "") if skip else check(checker))
        print(f"  {rows[-1]['status']}: {rows[-1]['figures']}", flush=True)
    report = {
        "model": model,
        "random_init": args.random_init or args.smoke,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq": args.seq,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "checks": rows,
        "workdir": str(workdir),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| {'check':18s} | {'status':34s} | figures")
    for r in rows:
        print(f"| {r['check']:18s} | {r['status']:34s} | {r['figures']}")
    print(f"\nreport: {args.out}  (run folders: {workdir})")
    sys.exit(1 if any(r["status"].startswith("FAIL") for r in rows) else 0)


if __name__ == "__main__":
    main()
