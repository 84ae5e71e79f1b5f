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
from fnscale.runtime.distributed import check_quantized_launch, make_accelerator, raise_if_any_failed, zero3_gathering, zero3_init_disabled, zero_stage
from fnscale.runtime.metrics import MetricsLog

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the run stands: optimizer steps done, the epoch and the batches of it consumed (the resume point), totals."""

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
class StepResult:
    """What one micro-batch did: its loss and tokens, whether it closed an optimizer step, whether that was skipped."""

    loss: float
    tokens: int
    bad: bool  # non-finite loss or gradient on some rank: no backward, and a closing step is skipped
    synced: bool  # the last micro-batch of an accumulation: the optimizer stepped (or skipped)
    grad_norm: float | None  # before clipping; None when not clipped or not synced


@dataclass
class LogWindow:
    """This rank's loss and token sums over the micro-batches since the last logged step."""

    loss: float = 0.0
    batches: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.time)

    def add(self, result: StepResult) -> None:
        self.loss += result.loss
        self.batches += 1
        self.tokens += result.tokens

    def totals(self, accelerator) -> tuple[float, int, float]:
        """(mean loss averaged over ranks, tokens summed over ranks, seconds since the window opened)."""
        elapsed = time.time() - self.t0
        tokens = int(accelerator.reduce(torch.tensor(self.tokens, device=accelerator.device), reduction="sum"))
        mean = torch.tensor(self.loss / max(1, self.batches), device=accelerator.device)
        return float(accelerator.reduce(mean, reduction="mean")), tokens, elapsed


# ---------------------------------------------------------------- the pieces a caller may swap (see `train`)


def build_model(cfg: TrainConfig, accelerator):
    """Tokenizer and model (with LoRA/QLoRA when asked); the main process converts GGUF first."""
    with accelerator.main_process_first():
        source = loading.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = loading.load_tokenizer(source, cfg.trust_remote_code)
    dtype = loading.resolve_dtype(cfg.dtype, accelerator.device)
    quant = loading.quantization_config(cfg.load_in_4bit, cfg.load_in_8bit, accelerator.device, dtype)
    if quant is not None and not cfg.lora:
        raise UsageError("--load-in-4bit/--load-in-8bit train an adapter; drop --no-lora")
    if quant is not None:  # 8-bit + ZeRO-3, 4-bit storage dtype vs DeepSpeed's bf16/fp16 cast
        check_quantized_launch(accelerator, cfg.load_in_4bit, cfg.load_in_8bit, dtype)
    device_map = {"": accelerator.device} if quant is not None and zero_stage(accelerator) != 3 else None
    model = loading.load_model(source, dtype, quant, cfg.trust_remote_code, device_map=device_map)
    if dtype == torch.float16 and not quant:
        # fp16 master weights diverge under AdamW; keep trainable weights in fp32, autocast does the rest.
        model = model.float()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] if cfg.lora_target_modules else None
        model = loading.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, quant is not None, cfg.gradient_checkpointing)
    return source, tokenizer, model


def save_final(accelerator, model, tokenizer, cfg: TrainConfig) -> dict[str, str]:
    """The adapter (LoRA) or the full model, consolidated from ZeRO shards, as safetensors; optionally merged."""
    out = Path(cfg.output_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; collective on every rank
    unwrapped = accelerator.unwrap_model(model)
    paths, error = {}, None
    if accelerator.is_main_process:
        try:
            if state_dict is None or not state_dict:
                raise RunError("the gathered model state is empty; with ZeRO-3 set zero3_save_16bit_model: true in the DeepSpeed config")
            with atomic_dir(out / "final") as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            paths["final"] = str(out / "final")
            if cfg.lora and cfg.merge_adapter:
                with zero3_init_disabled(accelerator):  # only this rank loads the base: no collective ZeRO-3 partitioning
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
    -> {name: path}` can be swapped: tests wrap them to record what each rank trained on, benchmarks to read peak memory.
    """
    # Checks and setup: cheap validation first, nothing heavy is loaded for a configuration that cannot run.
    validate(cfg)
    for source in (cfg.dataset, cfg.validation_dataset, *cfg.eval_retention):
        data.check_source(source)
    templates = check_train_options(cfg)  # the CLI runs it before importing torch; callers of train() get it here
    out = Path(cfg.output_dir)
    log_with = trackers.log_with(cfg.report_to, out)
    accelerator = make_accelerator(cfg.gradient_accumulation_steps, str(out), log_with, max_grad_norm=cfg.max_grad_norm, timeout_s=cfg.ddp_timeout)
    _check_writable(out, accelerator)
    if templates is not None:  # config.json only: a template for another model is refused before the weights load
        with accelerator.main_process_first():
            check_template_fits_config(templates, loading.resolve_model(cfg.model, cfg.gguf_file).path)
    set_seed(cfg.seed)

    # Model, data and (optionally) functional-network masks, built from templates or computed on the training data.
    source, tokenizer, model = build_model(cfg, accelerator)
    attn = attention.configure(model, cfg.attn_implementation, cfg.packing, accelerator.device)
    sft = _sft_data(cfg, tokenizer)
    if not cfg.train_attention:  # before the masks' guard and the optimizer: only MLP weights train
        freeze_outside_mlps(model)
    masker = _masker(cfg, model, tokenizer, sft, accelerator, source.display_name, templates)
    ewc.install(cfg, model, accelerator)  # EWC gradient hooks when --ewc-state is given (fnscale cl), else nothing

    # Data loaders, optimizer and LR schedule, wrapped by Accelerate.
    train_loader, val_loader = _loaders(cfg, sft, tokenizer, flatten=attn == "flash_attention_2")
    total_steps = _total_steps(cfg, len(train_loader), accelerator.num_processes)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, masker.no_decay_params() if masker is not None else None)
    if masker is not None:
        masker.bind_optimizer(optimizer)  # --optimizer-slices: the deltas' weight decay
    scheduler = make_scheduler(cfg, optimizer, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    # The validation loader stays unprepared: `sharded_loss` deals its batches to ranks itself, each sample once.

    # Retention before training: on the unmasked base, before masks go on and before any resume.
    retention = RetentionProbe(cfg.eval_retention, tokenizer, cfg.max_seq_length, cfg.batch_size) if cfg.eval_retention else None
    retention_before = retention.measure(accelerator.unwrap_model(model), accelerator, prefix="retention_before") if retention else None
    if masker is not None:
        masker.attach(accelerator.unwrap_model(model))

    # Resume, then open the metrics (metrics.jsonl continues from the resumed step) and trackers.
    progress = resume(accelerator, cfg.resume_from_checkpoint, out)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=progress.step if cfg.resume_from_checkpoint else None) if accelerator.is_main_process else None
    if log_with:
        accelerator.init_trackers(trackers.PROJECT, config=_tracker_config(cfg))
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, train_loader, val_loader, masker, metrics, total_steps)
    trainer.log({"step": progress.step, "examples": sft.counts})
    if retention_before is not None:
        trainer.log({"step": progress.step, **retention_before, **retention.describe()})
    if masker is not None:
        trainer.log({"step": progress.step, **masker.stats()})

    # The loop: optimizer steps until total_steps, or until SIGTERM/SIGUSR1 (which checkpoints first).
    start = time.time()
    show = accelerator.is_local_main_process
    with StopRequested() as stop, tqdm(total=total_steps, initial=progress.step, disable=not show, desc="train", dynamic_ncols=True) as bar:
        trainer.run(progress, stop, bar)

    # Finish: one exit path. A run stopped by a signal has its checkpoint and skips the final evaluation and save.
    summary = {"steps": progress.step, "total_steps": total_steps, "final_loss": progress.last_loss, "model": source.display_name,
               "output_dir": str(out), "examples": sft.counts}
    if progress.stopped_by_signal:
        summary["stopped"] = "signal"
        if not stop.interrupted:
            accelerator.print(f"stopped by signal at step {progress.step}; checkpoint saved, resume with --resume-from-checkpoint auto")
    else:
        summary.update(trainer.final_scores(progress.step, retention))
        summary.update(save_final(accelerator, model, tokenizer, cfg))
        summary["train_time_s"] = round(time.time() - start, 2)
        summary["tokens_per_s"] = round(progress.tokens_total / max(1e-9, summary["train_time_s"]), 1)
        _publish(accelerator, cfg, summary)
    accelerator.end_training()
    if progress.stopped_by_signal and stop.interrupted:  # Ctrl-C: exit 130, like any interrupted command
        raise Interrupted(f"interrupted at step {progress.step}; checkpoint saved in {out}, continue with the same command and --resume-from-checkpoint auto")
    return summary


# ---------------------------------------------------------------- setup


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
        tokenizer, cfg.dataset or data.DEFAULT_DATASET, cfg.max_seq_length, cfg.schema, cfg.template, cfg.validation_split,
        cfg.seed, cfg.validation_dataset, cfg.prompt_column, cfg.response_column, cfg.max_samples, train_on_inputs=cfg.train_on_inputs,
    )


def _loaders(cfg: TrainConfig, sft, tokenizer, flatten: bool = False) -> tuple[DataLoader, DataLoader | None]:
    """Shuffled training batches; validation batches in order when there is held-out data."""
    collate = partial(data.collate, pad_id=tokenizer.pad_token_id)
    train_loader = _train_loader(cfg, sft.train, tokenizer.pad_token_id, flatten)
    val_loader = DataLoader(sft.validation, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate) if sft.validation else None
    return train_loader, val_loader


def _train_loader(cfg: TrainConfig, items: list[dict], pad_id: int, flatten: bool) -> DataLoader:
    """Shuffled batches: padded (optionally length-grouped), or --packing rows of whole examples (flattened for FlashAttention)."""
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
        if ndim < 2 or "norm" in name.lower() or name.endswith(".bias") or (no_decay_params and id(p) in no_decay_params):
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
    fused = bool(devices) and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int, n_processes: int):
    """The prepared scheduler steps once per process per optimizer step (Accelerate's convention), so its length is scaled."""
    warmup = int(cfg.warmup_ratio * total_steps) * n_processes
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps * n_processes)


def resume(accelerator, resume_from: str | None, out: Path) -> Progress:
    """Load the newest loadable checkpoint (a corrupt one is skipped with a warning); returns where the run continues."""
    for ckpt in checkpoints.resolve_resume(resume_from, out):
        try:
            accelerator.load_state(str(ckpt))
        except Exception as err:  # a truncated or corrupt file
            log.warning("cannot load checkpoint %s (%s); trying the previous one", ckpt, type(err).__name__)
            continue
        state = checkpoints.read_state(ckpt)
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
        return Progress(step=state["step"], epoch=state["epoch"], batches_done=state["batches_in_epoch"])
    if resume_from and resume_from != "auto":
        raise UsageError(f"could not load checkpoint {resume_from}")
    return Progress()


# ---------------------------------------------------------------- the loop


class Trainer:
    """The prepared objects of one run and what happens to them: optimizer steps, logging, evaluation, checkpoints."""

    def __init__(self, cfg: TrainConfig, accelerator, model, optimizer, scheduler, train_loader, val_loader, masker,
                 metrics: MetricsLog | None, total_steps: int):
        self.cfg, self.accelerator, self.model, self.optimizer, self.scheduler = cfg, accelerator, model, optimizer, scheduler
        self.train_loader, self.val_loader, self.masker, self.metrics, self.total_steps = train_loader, val_loader, masker, metrics, total_steps
        self.window = LogWindow()  # reopened when the loop starts
        self._val_batches = None  # the validation batches, collated once

    def run(self, progress: Progress, stop: StopRequested, bar) -> None:
        """Epochs of micro-batches until `total_steps`, or until a stop signal; `progress` is updated in place."""
        self.model.train()
        self.window = LogWindow()
        while progress.step < self.total_steps and not progress.stopped_by_signal:
            for batch in self._epoch_batches(progress):
                progress.batches_done += 1
                result = self.micro_step(batch)
                if not result.bad:
                    self.window.add(result)
                if not result.synced:
                    continue
                if result.bad:
                    self._skip_bad_step(progress)
                    continue
                progress.step, progress.bad_in_row = progress.step + 1, 0
                bar.update(1)
                if self._after_step(progress, result.grad_norm, stop, bar):
                    break
            if progress.step < self.total_steps and not progress.stopped_by_signal:  # the epoch ran out
                progress.epoch, progress.batches_done = progress.epoch + 1, 0

    def _epoch_batches(self, progress: Progress):
        """This epoch's batches in its seeded order, minus those consumed before a resume."""
        self.train_loader.set_epoch(progress.epoch)
        if progress.batches_done:
            return self.accelerator.skip_first_batches(self.train_loader, progress.batches_done)
        return self.train_loader

    def micro_step(self, batch) -> StepResult:
        """Forward and backward of one micro-batch; at an accumulation boundary, clip and step, or skip a non-finite step."""
        acc, grad_norm = self.accelerator, None
        with acc.accumulate(self.model):
            loss = self.model(**batch).loss
            bad = _any_rank(acc, not torch.isfinite(loss).item())
            if not bad:
                acc.backward(loss)
            synced = acc.sync_gradients
            if synced and not bad and self.cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                grad_norm = float(grad_norm) if grad_norm is not None else None
                bad = grad_norm is not None and not math.isfinite(grad_norm)
            if synced:
                self._apply_or_skip(bad)
        return StepResult(float(loss.detach()), packing.batch_tokens(batch), bad, synced, grad_norm)

    def _apply_or_skip(self, bad: bool) -> None:
        if not bad:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not bad and self.masker is not None:
            self.masker.after_step()

    def _skip_bad_step(self, progress: Progress) -> None:
        progress.bad_in_row += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", progress.step + 1, progress.bad_in_row)
        if progress.bad_in_row >= self.cfg.max_bad_steps:
            raise RunError(
                f"{progress.bad_in_row} non-finite steps in a row; lower --learning-rate or use --dtype float32/bfloat16 (last good checkpoint kept)"
            )

    def _after_step(self, progress: Progress, grad_norm: float | None, stop: StopRequested, bar) -> bool:
        """Log, evaluate and checkpoint as scheduled after a good optimizer step; True when the run should end."""
        cfg, step = self.cfg, progress.step
        if step % cfg.logging_steps == 0 or step == self.total_steps:
            self._log_window(progress, grad_norm, bar)
        if self.val_loader is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < self.total_steps:
            self.log({"step": step, "eval_loss": self.evaluate()})
        progress.stopped_by_signal = _any_rank(self.accelerator, stop.flag)
        if (cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < self.total_steps) or progress.stopped_by_signal:
            save_checkpoint(self.accelerator, cfg, progress.checkpoint_state())
        return progress.stopped_by_signal or step >= self.total_steps

    def _log_window(self, progress: Progress, grad_norm: float | None, bar) -> None:
        loss, tokens, elapsed = self.window.totals(self.accelerator)
        progress.tokens_total += tokens
        progress.last_loss = loss
        self.log({
            "step": progress.step, "epoch": round(progress.epoch + progress.batches_done / max(1, len(self.train_loader)), 4), "loss": loss,
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "step_time_s": elapsed / max(1, self.cfg.logging_steps),
        })
        bar.set_postfix(loss=f"{loss:.4f}")
        self.window = LogWindow()

    def evaluate(self) -> float:
        """Validation loss per scored token: each sample counted once, whatever the number of ranks."""
        if self._val_batches is None:
            self._val_batches = list(self.val_loader)
        return sharded_loss(self.model, self._val_batches, self.accelerator)

    def final_scores(self, step: int, retention: RetentionProbe | None) -> dict:
        """Validation loss, then the masks come off (the saved model runs unmasked) and retention is measured after training."""
        scores = {}
        if self.val_loader is not None:
            scores["eval_loss"] = self.evaluate()
            self.log({"step": step, "eval_loss": scores["eval_loss"]})
        if self.masker is not None:
            self.masker.remove()
        if retention is not None:
            after = retention.measure(self.accelerator.unwrap_model(self.model), self.accelerator, prefix="retention_after")
            self.log({"step": step, **after})
            scores.update({**after, **retention.describe()})
        return scores

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl (main process) and its finite scalars to the trackers."""
        if self.metrics is not None:
            self.metrics.write(record)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v)}
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
        raise RunError(f"could not save checkpoint {target}: {err.strerror or err}; free disk space and resume with --resume-from-checkpoint auto") from err
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
        summary["hub_url"] = push_folder(Path(summary.get("merged") or summary["final"]), cfg.hub_repo_id, cfg.hub_private)


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


def _masker(cfg, model, tokenizer, sft, accelerator, model_name: str, templates: Templates | None):
    """The run's masks: from the templates preflight loaded, or networks computed on the training data."""
    if cfg.mask_mode == "none":
        return None
    if templates is None:
        templates = (Templates.load(cfg.ica_template_path) if cfg.ica_template_path
                     else compute_templates(cfg, model, tokenizer, sft, accelerator, model_name))
    return setup_masks(cfg, model, accelerator, templates)


def compute_templates(cfg, model, tokenizer, sft, accelerator, model_name: str) -> Templates:
    """Templates from the first --ica-samples training examples, saved in the output dir."""
    samples = [ex["input_ids"] for ex in sft.train[: cfg.ica_samples]]
    with zero3_gathering(model, accelerator):  # ZeRO-3: forwards gather the partitioned weights module by module, LoRA left alone
        templates = build_templates(
            model, samples, n_components=cfg.ica_components, percentile=cfg.ica_percentile, site=cfg.ica_site,
            batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id, seed=cfg.seed, accelerator=accelerator,
            model_name=model_name, datasets=[cfg.dataset or "default"],
        )
    if accelerator.is_main_process:
        out = Path(cfg.output_dir) / "templates"
        templates.save_folder(out)
        log.info("computed %d functional networks on %d samples; saved in %s", cfg.ica_components, len(samples), out)
    return templates
