"""The SFT recipe: an Accelerate loop that runs unchanged on CPU, one GPU, DDP and DeepSpeed ZeRO.

`train()` reads top to bottom: checks and setup, model and data (and functional-network masks), optimizer
and schedule, retention before training, resume, the loop, and one exit path (final evaluation, save,
summary). The loop's moving parts live in `Trainer`: one optimizer step, the logging window, checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import set_seed
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from fnscale import data
from fnscale.config import TrainConfig
from fnscale.continual import ewc
from fnscale.data import packing
from fnscale.data.tokenize import IGNORE
from fnscale.errors import Interrupted, RunError, UsageError
from fnscale.eval.scoring import RetentionProbe, sharded_loss
from fnscale.masking.setup import setup_masks
from fnscale.masking.update import freeze_outside_mlps
from fnscale.models import attention, loading
from fnscale.models.hub import push_folder
from fnscale.models.publish import publish_run
from fnscale.networks.templates import Templates
from fnscale.preflight import check_template_fits_config, check_train_options
from fnscale.recipes.build_networks import build_templates
from fnscale.runtime import checkpoints, trackers
from fnscale.runtime.atomic import atomic_dir, write_json
from fnscale.runtime.distributed import (
    broadcast_from_main,
    check_quantized_launch,
    launch_device_type,
    launch_mixed_precision,
    make_accelerator,
    raise_if_any_failed,
    rank_failures,
    uses_deepspeed,
    zero3_gathering,
    zero3_init_disabled,
    zero_stage,
)
from fnscale.runtime.metrics import MetricsLog

log = logging.getLogger(__name__)
STOP_CHECK_STEPS = 5  # under several ranks, the stop flag is all-reduced every this many optimizer steps


@dataclass
class Progress:
    """Where the run stands: optimizer steps done, the epoch and the batches of it consumed (the resume point),
    totals."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    bad_in_row: int = 0
    last_loss: float = float("nan")
    tokens_total: int = 0
    stopped_by_signal: bool = False

    def checkpoint_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_done, "loss": self.last_loss}


@dataclass
class LogWindow:
    """Sums since the last logged step, kept on the device so nothing waits for the host until the log line.

    `nll` and `tokens` are this rank's summed token NLL and trained tokens over applied steps (the loss is their
    ratio over all ranks: token-weighted, as each optimizer step's loss is); `tokens_seen` counts every real token.
    """

    device: torch.device
    nll: torch.Tensor = None
    tokens: torch.Tensor = None
    tokens_seen: torch.Tensor = None
    t0: float = field(default_factory=time.time)

    def __post_init__(self):
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.nll, self.tokens, self.tokens_seen = zero.clone(), zero.clone(), zero.clone()

    def add(self, step: StepSums) -> None:
        self.nll += step.nll
        self.tokens += step.tokens
        self.tokens_seen += step.tokens_seen

    def totals(self, accelerator) -> tuple[float, int, float]:
        """(loss per trained token over all ranks, real tokens summed over ranks, seconds since the window opened):
        one reduce and one host sync per logged step."""
        elapsed = time.time() - self.t0
        sums = torch.stack([self.nll, self.tokens, self.tokens_seen])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        nll, tokens, seen = sums.tolist()
        return (nll / tokens if tokens else float("nan")), int(seen), elapsed


@dataclass
class StepSums:
    """One optimizer step on this rank, as device tensors: summed token NLL, trained tokens, real tokens."""

    nll: torch.Tensor
    tokens: torch.Tensor
    tokens_seen: torch.Tensor


@dataclass
class Prepared:
    """What the recipe prepares for the loop, wrapped by Accelerate (the validation loader stays unprepared)."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    train_loader: DataLoader
    val_loader: DataLoader | None
    masker: object | None
    total_steps: int


# ---------------------------------------------------------------- the pieces a caller may swap (see `train`)


def precision(cfg: TrainConfig, device_type: str) -> loading.PrecisionPlan:
    """The run's precision plan (see `loading.precision_plan`) on this launch's device."""
    bf16 = device_type != "cuda" or torch.cuda.is_bf16_supported()
    return loading.precision_plan(
        cfg.precision,
        cfg.dtype,
        device_type,
        bf16,
        lora=cfg.lora,
        quantized=cfg.load_in_4bit or cfg.load_in_8bit,
        launch_mixed=launch_mixed_precision(),
    )


def build_model(cfg: TrainConfig, accelerator):
    """Tokenizer and model (with LoRA/QLoRA when asked) in the precision plan's dtype; GGUF converted first."""
    with accelerator.main_process_first():
        source = loading.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(source, cfg.trust_remote_code)
    plan = precision(cfg, accelerator.device.type)
    quant = loading.quantization_config(cfg.load_in_4bit, cfg.load_in_8bit, accelerator.device, plan.compute)
    if quant is not None and not cfg.lora:
        raise UsageError("--load-in-4bit/--load-in-8bit train an adapter; drop --no-lora")
    if quant is not None:  # 8-bit + ZeRO-3, 4-bit storage dtype vs DeepSpeed's bf16/fp16 cast
        check_quantized_launch(accelerator, cfg.load_in_4bit, cfg.load_in_8bit, plan.compute)
    device_map = {"": accelerator.device} if quant is not None and zero_stage(accelerator) != 3 else None
    model = loading.load_model(source, plan.weights, quant, cfg.trust_remote_code, device_map=device_map)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        targets = (
            [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] if cfg.lora_target_modules else None
        )
        model = loading.add_lora(
            model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, quant is not None, cfg.gradient_checkpointing
        )
    return source, tokenizer, model


def place_model(model, accelerator) -> None:
    """The model on the run's device before masks are set up, so computed networks capture where the batches go.

    Left alone: parameters ZeRO-3 partitioned at load (`ds_id`) and quantized models (placed by their device map);
    `prepare` places the rest on the same device later anyway.
    """
    if getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False):
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    model.to(accelerator.device)


def save_final(accelerator, model, tokenizer, cfg: TrainConfig) -> dict[str, str]:
    """The adapter (LoRA) or the full model, consolidated from ZeRO shards, as safetensors; optionally merged."""
    out = Path(cfg.output_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; collective on every rank
    unwrapped = accelerator.unwrap_model(model)
    paths, error = {}, None
    if accelerator.is_main_process:
        try:
            if state_dict is None or not state_dict:
                raise RunError(
                    "the gathered model state is empty; with ZeRO-3 set zero3_save_16bit_model: true in the DeepSpeed "
                    "config"
                )
            with atomic_dir(out / "final") as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            paths["final"] = str(out / "final")
            if cfg.lora and cfg.merge_adapter:
                with zero3_init_disabled(
                    accelerator
                ):  # only this rank loads the base: no collective ZeRO-3 partitioning
                    paths["merged"] = str(merge_adapter(cfg, out / "final", out / "merged"))
        except Exception as err:  # every rank hears of it below instead of waiting at a barrier
            error = err
    raise_if_any_failed(accelerator, error, "saving the final model")
    return paths


def merge_adapter(cfg: TrainConfig, adapter_dir: Path, target: Path) -> Path:
    """Reload the base in full precision and merge the saved adapter: merging into 4-bit weights would lose it."""
    source = loading.resolve_model(cfg.model, cfg.gguf_file)
    base = loading.load_model(source, loading.DTYPES.get(cfg.dtype, torch.float32), None, cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loading.load_tokenizer(source).save_pretrained(tmp)
    return target


# ---------------------------------------------------------------- the recipe


def train(cfg: TrainConfig, *, build_model=build_model, save_final=save_final) -> dict:
    """Run SFT as configured; returns the run summary (also written to output_dir/summary.json).

    `build_model(cfg, accelerator) -> (source, tokenizer, model)` and `save_final(accelerator, model, tokenizer, cfg)
    -> {name: path}` can be swapped: tests wrap them to record what each rank trained on, benchmarks to read peak
    memory.
    """
    # Checks and setup: cheap validation first, nothing heavy is loaded for a configuration that cannot run.
    templates = check(cfg)
    out = Path(cfg.output_dir)
    log_with = trackers.log_with(cfg.report_to, out)
    mixed = precision(cfg, launch_device_type()).autocast
    accelerator = make_accelerator(
        cfg.gradient_accumulation_steps,
        str(out),
        log_with,
        max_grad_norm=cfg.max_grad_norm,
        timeout_s=cfg.ddp_timeout,
        mixed_precision=mixed,
    )
    _check_writable(out, accelerator)
    if templates is not None:  # config.json only: a template for another model is refused before the weights load
        with accelerator.main_process_first():
            check_template_fits_config(templates, loading.resolve_model(cfg.model, cfg.gguf_file).path)
    set_seed(cfg.seed)

    # Model, data, masks (from templates, or networks computed on the training data), optimizer, prepared.
    source, tokenizer, model = build_model(cfg, accelerator)
    sft = _sft_data(cfg, tokenizer)
    prepared, retention, retention_before = prepare(
        cfg, accelerator, model, tokenizer, sft, source.display_name, templates
    )

    # Resume, then open the metrics (metrics.jsonl continues from the resumed step) and trackers.
    progress = resume(accelerator, cfg.resume_from_checkpoint, out)
    metrics = (
        MetricsLog(out / "metrics.jsonl", resume_step=progress.step if cfg.resume_from_checkpoint else None)
        if accelerator.is_main_process
        else None
    )
    if log_with:
        accelerator.init_trackers(trackers.PROJECT, config=_tracker_config(cfg))
    trainer = Trainer(cfg, prepared, metrics)
    for record in ({"examples": sft.counts}, retention_before, prepared.masker and prepared.masker.stats()):
        if record:
            trainer.log({"step": progress.step, **record})

    # The loop: optimizer steps until total_steps, or until SIGTERM/SIGUSR1 (which checkpoints first).
    start = time.time()
    quiet = not accelerator.is_local_main_process
    with (
        StopRequested() as stop,
        tqdm(total=prepared.total_steps, initial=progress.step, disable=quiet, desc="train", dynamic_ncols=True) as bar,
    ):
        trainer.run(progress, stop, bar)

    # Finish: one exit path. A run stopped by a signal has its checkpoint and skips the final evaluation and save.
    summary = {
        "steps": progress.step,
        "total_steps": prepared.total_steps,
        "final_loss": progress.last_loss,
        "model": source.display_name,
        "output_dir": str(out),
        "examples": sft.counts,
    }
    if progress.stopped_by_signal:
        summary["stopped"] = "signal"
        if not stop.interrupted:
            accelerator.print(
                f"stopped by signal at step {progress.step}; checkpoint saved, resume with --resume-from-checkpoint "
                "auto"
            )
    else:
        summary.update(trainer.final_scores(progress.step, retention))
        summary.update(save_final(accelerator, prepared.model, tokenizer, cfg))
        summary["train_time_s"] = round(time.time() - start, 2)
        summary["tokens_per_s"] = round(progress.tokens_total / max(1e-9, summary["train_time_s"]), 1)
        _publish(accelerator, cfg, summary)
    accelerator.end_training()
    if progress.stopped_by_signal and stop.interrupted:  # Ctrl-C: exit 130, like any interrupted command
        raise Interrupted(
            f"interrupted at step {progress.step}; checkpoint saved in {out}, continue with the same "
            "command and --resume-from-checkpoint auto"
        )
    return summary


def prepare(cfg: TrainConfig, accelerator, model, tokenizer, sft, model_name: str, templates):
    """Masks, loaders, optimizer and schedule, wrapped by Accelerate; retention measured on the unmasked base.

    Returns (Prepared, the retention probe or None, its scores before training or None).
    """
    attn = attention.configure(model, cfg.attn_implementation, cfg.packing, accelerator.device)
    place_model(model, accelerator)  # computed networks capture on the run's device
    if not cfg.train_attention:  # before the masks' guard and the optimizer: only MLP weights train
        freeze_outside_mlps(model)
    masker = _masker(cfg, model, tokenizer, sft, accelerator, model_name, templates)
    ewc.install(cfg, model, accelerator)  # EWC gradient hooks when --ewc-state is given (fnscale cl), else nothing
    train_loader, val_loader = _loaders(cfg, sft, tokenizer, flatten=attn == "flash_attention_2")
    total_steps = _total_steps(cfg, len(train_loader), accelerator.num_processes)
    no_decay = masker.no_decay_params() if masker is not None else None
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, no_decay)
    if masker is not None:
        masker.bind_optimizer(optimizer)  # --optimizer-slices: the deltas' weight decay
    scheduler = make_scheduler(cfg, optimizer, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    # The validation loader stays unprepared: `sharded_loss` deals its batches to ranks itself, each sample once.
    retention, before = None, None
    if cfg.eval_retention:
        retention = RetentionProbe(cfg.eval_retention, tokenizer, cfg.max_seq_length, cfg.batch_size)
        before = {
            **retention.measure(accelerator.unwrap_model(model), accelerator, prefix="retention_before"),
            **retention.describe(),
        }
    if masker is not None:  # after retention-before: it measures the unmasked base
        masker.attach(accelerator.unwrap_model(model))
    prepared = Prepared(accelerator, model, optimizer, scheduler, train_loader, val_loader, masker, total_steps)
    return prepared, retention, before


# ---------------------------------------------------------------- setup


def check(cfg: TrainConfig):
    """All checks that need no model: options, data sources, templates (returned when given, else None)."""
    validate(cfg)
    for source in (cfg.dataset, cfg.validation_dataset, *cfg.eval_retention):
        data.check_source(source)
    precision(cfg, launch_device_type())  # an impossible --precision/--dtype is refused before anything loads
    return check_train_options(cfg)  # the CLI runs it before importing torch; callers of train() get it here


def validate(cfg: TrainConfig) -> None:
    """Cheap checks before anything heavy is loaded."""
    if cfg.push_to_hub and not cfg.hub_repo_id:
        raise UsageError("--push-to-hub needs --hub-repo-id (e.g. me/my-model)")
    for name in ("batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.learning_rate <= 0:
        raise UsageError("--learning-rate must be positive")
    if not 0 < cfg.ica_percentile < 100:
        raise UsageError(f"--ica-percentile {cfg.ica_percentile} must be between 0 and 100 (exclusive)")
    attention.check(cfg.attn_implementation, cfg.packing, cfg.group_by_length, cfg.dtype)


def _check_writable(out: Path, accelerator) -> None:
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".fnscale_write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UsageError(f"--output-dir {out} is not writable ({err.strerror}); pick another folder") from err


def _tracker_config(cfg: TrainConfig) -> dict:
    """Hyper-parameters for TensorBoard and summary.json (no secrets live in the config)."""
    return {k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if v is not None}


def _sft_data(cfg: TrainConfig, tokenizer) -> data.SFTData:
    return data.build_sft_data(
        tokenizer,
        cfg.dataset or data.DEFAULT_DATASET,
        cfg.max_seq_length,
        cfg.schema,
        cfg.template,
        cfg.validation_split,
        cfg.seed,
        cfg.validation_dataset,
        cfg.prompt_column,
        cfg.response_column,
        cfg.max_samples,
        train_on_inputs=cfg.train_on_inputs,
    )


def _loaders(cfg: TrainConfig, sft, tokenizer, flatten: bool = False) -> tuple[DataLoader, DataLoader | None]:
    """Shuffled training batches; validation batches in order when there is held-out data."""
    collate = partial(data.collate, pad_id=tokenizer.pad_token_id)
    train_loader = _train_loader(cfg, sft.train, tokenizer.pad_token_id, flatten)
    val_loader = (
        DataLoader(sft.validation, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        if sft.validation
        else None
    )
    return train_loader, val_loader


def _train_loader(cfg: TrainConfig, items: list[dict], pad_id: int, flatten: bool) -> DataLoader:
    """Shuffled batches: padded (optionally length-grouped), or --packing rows of whole examples (flattened for
    FlashAttention)."""
    if cfg.packing:
        rows = packing.pack_rows(items, cfg.max_seq_length)
        collate = partial(packing.collate_packed, pad_id=pad_id, flatten=flatten)
        return DataLoader(rows, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
    collate = partial(data.collate, pad_id=pad_id)
    if cfg.group_by_length:
        sampler = packing.SeededLengthGroupedSampler(cfg.batch_size, [len(i["input_ids"]) for i in items], cfg.seed)
        return DataLoader(items, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    return DataLoader(items, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=False)


def _total_steps(cfg: TrainConfig, n_batches: int, n_processes: int) -> int:
    """--max-steps, or the optimizer steps of --num-epochs over the batches each process sees."""
    steps_per_epoch = max(1, math.ceil(n_batches / n_processes / cfg.gradient_accumulation_steps))
    return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.num_epochs))


def optimizer_groups(model, weight_decay: float, no_decay_params: set[int] | None = None):
    """AdamW groups: no decay on biases, norms, embeddings' 1-D params, or params the masks protect."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 (zero.Init) leaves an empty 1-D placeholder in p
        if (
            ndim < 2
            or "norm" in name.lower()
            or name.endswith(".bias")
            or (no_decay_params and id(p) in no_decay_params)
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops empty groups from the optimizer, which would leave the LR scheduler one group too many.
    return [g for g in groups if g["params"]]


def make_optimizer(model, lr: float, weight_decay: float, no_decay_params: set[int] | None = None) -> torch.optim.AdamW:
    """AdamW over `optimizer_groups`; the fused kernel on CPU/CUDA (4x faster than the per-tensor loop on CPU)."""
    groups = optimizer_groups(model, weight_decay, no_decay_params)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = (
        bool(devices) and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    )
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int, n_processes: int):
    """The prepared scheduler steps once per process per optimizer step (Accelerate's convention), so its length is
    scaled."""
    warmup = int(cfg.warmup_ratio * total_steps) * n_processes
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps * n_processes
    )


def resume(accelerator, resume_from: str | None, out: Path) -> Progress:
    """Load the newest checkpoint every rank can load; returns where the run continues.

    The main process picks the candidates and every rank tries them in that order; after each attempt the ranks
    share whether any failed, so all fall back to the previous checkpoint together. A load that fails everywhere
    leaves possibly half-loaded weights: that stops the run instead of training them from step 0.
    """
    try:
        found, error = [str(p) for p in checkpoints.resolve_resume(resume_from, out)], None
    except UsageError as err:
        found, error = [], str(err)
    found, error = (
        broadcast_from_main((found, error), accelerator)
        if accelerator.is_main_process
        else broadcast_from_main(None, accelerator)
    )
    if error:
        raise UsageError(error)
    for ckpt in found:
        try:
            accelerator.load_state(ckpt)
            err = None
        except Exception as exc:  # a truncated or corrupt file, on this rank or another
            err = exc
        failed = rank_failures(accelerator, err)
        if failed:
            rank, msg = failed[0]
            log.warning("cannot load checkpoint %s (rank %d: %s); trying the previous one", ckpt, rank, msg)
            continue
        state = broadcast_from_main(checkpoints.read_state(Path(ckpt)), accelerator)
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
        return Progress(step=state["step"], epoch=state["epoch"], batches_done=state["batches_in_epoch"])
    if found:
        raise RunError(
            f"no checkpoint in {out} loads on every rank ({len(found)} tried); remove the broken ones or "
            "start without --resume-from-checkpoint"
        )
    return Progress()


# ---------------------------------------------------------------- the loop


class Trainer:
    """The prepared objects of one run and what happens to them: optimizer steps, logging, evaluation, checkpoints.

    One optimizer step is one window of up to --gradient-accumulation-steps micro-batches. Its loss is the summed
    token NLL over the window's micro-batches and all ranks divided by the number of trained tokens in them (the
    global count, reduced once per step), so 1 x 8, 2 x 4 and 4 x 2 micro-batches, on any number of ranks, give
    the same loss and gradients. Backward runs on every micro-batch (DeepSpeed steps inside the last one); a step
    with a non-finite gradient is skipped whole: by the GradScaler under fp16, by DeepSpeed's overflow check under
    DeepSpeed, else by the gradient norm (the one host sync of a step). Losses stay on the device until a log line.
    """

    def __init__(self, cfg: TrainConfig, prepared: Prepared, metrics: MetricsLog | None):
        self.cfg, self.p, self.metrics = cfg, prepared, metrics
        self.accelerator, self.model, self.optimizer = prepared.accelerator, prepared.model, prepared.optimizer
        self.total_steps = prepared.total_steps
        self.window = LogWindow(self.accelerator.device)  # reopened when the loop starts
        self.grad_norm = None  # the last applied step's norm (a tensor or float), read at the log line
        self._val_batches = None  # the validation batches, collated once

    def run(self, progress: Progress, stop: StopRequested, bar) -> None:
        """Epochs of optimizer steps until `total_steps`, or until a stop signal; `progress` is updated in place."""
        self.model.train()
        self.window = LogWindow(self.accelerator.device)
        while progress.step < self.total_steps and not progress.stopped_by_signal:
            for window in _windows(self._epoch_batches(progress), self.cfg.gradient_accumulation_steps):
                progress.batches_done += len(window)
                sums, applied = self.optimizer_step(window)
                if not applied:
                    self._skip_bad_step(progress)
                    continue
                self.window.add(sums)
                progress.step, progress.bad_in_row = progress.step + 1, 0
                bar.update(1)
                if self._after_step(progress, stop, bar):
                    break
            if progress.step < self.total_steps and not progress.stopped_by_signal:  # the epoch ran out
                progress.epoch, progress.batches_done = progress.epoch + 1, 0

    def _epoch_batches(self, progress: Progress):
        """This epoch's batches in its seeded order, minus those consumed before a resume."""
        loader = self.p.train_loader
        loader.set_epoch(progress.epoch)
        if progress.batches_done:
            return self.accelerator.skip_first_batches(loader, progress.batches_done)
        return loader

    def optimizer_step(self, window: list[dict]) -> tuple[StepSums, bool]:
        """Forward and backward of the window's micro-batches, then clip and step (or skip); (sums, applied)."""
        acc = self.accelerator
        counts = [trained_tokens(b) for b in window]
        local = torch.stack(counts).sum()
        total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        # Accelerate (and DeepSpeed) divide the loss by the accumulation steps and DDP averages over ranks: undone here.
        scale = acc.gradient_accumulation_steps * acc.num_processes / total.clamp(min=1).to(torch.float32)
        nll_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            acc.gradient_state._set_sync_gradients(last)  # as transformers' Trainer does: the window decides
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                nll = token_nll(self.model, batch)
                acc.backward(nll * scale)  # DeepSpeed runs engine.step() inside the last one
            nll_sum += nll.detach().double()
        applied = self._apply()
        seen = sum(packing.batch_tokens(b, as_tensor=True) for b in window)
        return StepSums(nll_sum, local.double(), seen.double()), applied

    def _apply(self) -> bool:
        """Clip and step after the window's last backward; False when the step was skipped as non-finite."""
        acc, cfg = self.accelerator, self.cfg
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: the norm, no clipping
        norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)  # unscales first under fp16
        if uses_deepspeed(acc) or acc.scaler is not None:
            # DeepSpeed: a no-op (the engine stepped in backward); GradScaler: skips an inf step, updates the scale
            self.optimizer.step()
            applied = not self.optimizer.step_was_skipped
        else:
            # the step's one host sync; under DDP the norm of the reduced gradients, the same on every rank
            applied = bool(torch.isfinite(torch.as_tensor(norm)).item())
            if applied:
                self.optimizer.step()
        if applied:
            self.p.scheduler.step()
            self.grad_norm = norm if cfg.max_grad_norm > 0 else None
            if self.p.masker is not None:
                self.p.masker.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def _skip_bad_step(self, progress: Progress) -> None:
        progress.bad_in_row += 1
        log.warning(
            "non-finite loss or gradient at step %d: step skipped (%d in a row)", progress.step + 1, progress.bad_in_row
        )
        if progress.bad_in_row >= self.cfg.max_bad_steps:
            raise RunError(
                f"{progress.bad_in_row} non-finite steps in a row; lower --learning-rate or use --dtype "
                "float32/bfloat16 (last good checkpoint kept)"
            )

    def _after_step(self, progress: Progress, stop: StopRequested, bar) -> bool:
        """Log, evaluate and checkpoint as scheduled after a good optimizer step; True when the run should end."""
        cfg, step = self.cfg, progress.step
        if step % cfg.logging_steps == 0 or step == self.total_steps:
            self._log_window(progress, bar)
        evaluate = self.p.val_loader is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0
        if evaluate and step < self.total_steps:
            self.log({"step": step, "eval_loss": self.evaluate()})
        if self.accelerator.num_processes == 1 or step % STOP_CHECK_STEPS == 0:  # the ranks agree through a collective
            progress.stopped_by_signal = _any_rank(self.accelerator, stop.flag)
        if (
            cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < self.total_steps
        ) or progress.stopped_by_signal:
            save_checkpoint(self.accelerator, cfg, progress.checkpoint_state())
        return progress.stopped_by_signal or step >= self.total_steps

    def _log_window(self, progress: Progress, bar) -> None:
        loss, tokens, elapsed = self.window.totals(self.accelerator)
        progress.tokens_total += tokens
        progress.last_loss = loss
        norm = None if self.grad_norm is None else float(self.grad_norm)
        epoch = progress.epoch + progress.batches_done / max(1, len(self.p.train_loader))
        self.log(
            {
                "step": progress.step,
                "epoch": round(epoch, 4),
                "loss": loss,
                "lr": self.p.scheduler.get_last_lr()[0],
                "grad_norm": norm,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                "step_time_s": elapsed / max(1, self.cfg.logging_steps),
            }
        )
        bar.set_postfix(loss=f"{loss:.4f}")
        self.window = LogWindow(self.accelerator.device)

    def evaluate(self) -> float:
        """Validation loss per scored token: each sample counted once, whatever the number of ranks."""
        if self._val_batches is None:
            self._val_batches = list(self.p.val_loader)
        return sharded_loss(self.model, self._val_batches, self.accelerator)

    def final_scores(self, step: int, retention: RetentionProbe | None) -> dict:
        """Validation loss, then the masks come off (the saved model runs unmasked) and retention is measured after
        training."""
        scores = {}
        if self.p.val_loader is not None:
            scores["eval_loss"] = self.evaluate()
            self.log({"step": step, "eval_loss": scores["eval_loss"]})
        if self.p.masker is not None:
            self.p.masker.remove()
        if retention is not None:
            after = retention.measure(
                self.accelerator.unwrap_model(self.model), self.accelerator, prefix="retention_after"
            )
            self.log({"step": step, **after})
            scores.update({**after, **retention.describe()})
        return scores

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl (main process) and its finite scalars to the trackers."""
        if self.metrics is not None:
            self.metrics.write(record)
        scalars = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v)
        }
        if scalars and self.accelerator.trackers:
            self.accelerator.log(scalars, step=record["step"])


# ---------------------------------------------------------------- checkpoints and outputs


def save_checkpoint(accelerator, cfg: TrainConfig, state: dict) -> Path:
    """All ranks write accelerator state into a temp folder; the main process marks it complete and renames."""
    out = Path(cfg.output_dir)
    target = out / f"{checkpoints.PREFIX}{state['step']}"
    tmp = out / f".{target.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(
            f"could not save checkpoint {target}: {err.strerror or err}; free disk space and resume with "
            "--resume-from-checkpoint auto"
        ) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoints.finish(tmp, target, state)
        checkpoints.rotate(out, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return target


def _publish(accelerator, cfg: TrainConfig, summary: dict) -> None:
    """summary.json with the configuration, then the hub upload when asked (its URL joins the returned summary)."""
    if not accelerator.is_main_process:
        return
    publish_run(cfg, summary)  # base by hub id, model card, networks copy beside the model; names the data in summary
    write_json(Path(cfg.output_dir) / "summary.json", {**summary, "config": _tracker_config(cfg)})
    if cfg.push_to_hub:
        summary["hub_url"] = push_folder(
            Path(summary.get("merged") or summary["final"]), cfg.hub_repo_id, cfg.hub_private
        )


# ---------------------------------------------------------------- signals and ranks


class StopRequested:
    """SIGTERM/SIGUSR1 (SLURM pre-emption) and a first Ctrl-C set a flag; the loop finishes its step, checkpoints
    and exits. A second Ctrl-C gets Python's default handler back: KeyboardInterrupt, at once."""

    def __init__(self):
        self.flag = False
        self.interrupted = False  # the stop came from SIGINT (Ctrl-C): the command exits 130
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %s: checkpointing and exiting", signal.Signals(signum).name)
        self.flag = True
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            log.warning("press Ctrl-C again to stop at once, without a checkpoint")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if it is true on one, so all ranks take the same branch."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0) if accelerator.num_processes > 1 else flag


def _windows(batches, size: int):
    """The micro-batches of each optimizer step: lists of `size`, the last one of an epoch shorter when they run out."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def trained_tokens(batch: dict) -> torch.Tensor:
    """Labelled next-token targets of a micro-batch (a device tensor): what its summed NLL is divided by."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def token_nll(model, batch: dict) -> torch.Tensor:
    """Summed next-token NLL (fp32) over a micro-batch's labelled targets: transformers' causal-LM loss, unreduced."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    target = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def _masker(cfg, model, tokenizer, sft, accelerator, model_name: str, templates: Templates | None):
    """The run's masks: from the templates preflight loaded, or networks computed on the training data."""
    if cfg.mask_mode == "none":
        return None
    if templates is None:
        templates = (
            Templates.load(cfg.ica_template_path)
            if cfg.ica_template_path
            else compute_templates(cfg, model, tokenizer, sft, accelerator, model_name)
        )
    return setup_masks(cfg, model, accelerator, templates)


def compute_templates(cfg, model, tokenizer, sft, accelerator, model_name: str) -> Templates:
    """Templates from the first --ica-samples training examples, saved in the output dir."""
    samples = [ex["input_ids"] for ex in sft.train[: cfg.ica_samples]]
    with zero3_gathering(
        model, accelerator
    ):  # ZeRO-3: forwards gather the partitioned weights module by module, LoRA left alone
        templates = build_templates(
            model,
            samples,
            n_components=cfg.ica_components,
            percentile=cfg.ica_percentile,
            site=cfg.ica_site,
            batch_size=cfg.batch_size,
            pad_id=tokenizer.pad_token_id,
            seed=cfg.seed,
            accelerator=accelerator,
            model_name=model_name,
            datasets=[cfg.dataset or "default"],
        )
    if accelerator.is_main_process:
        out = Path(cfg.output_dir) / "templates"
        templates.save_folder(out)
        log.info("computed %d functional networks on %d samples; saved in %s", cfg.ica_components, len(samples), out)
    return templates
