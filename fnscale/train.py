"""The SFT recipe: an Accelerate loop that runs unchanged on CPU, one GPU, DDP and DeepSpeed ZeRO.

Read top to bottom: set up, (optionally) build and apply functional-network masks, train with
checkpoints and evaluation, save the final adapter or model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fnscale import checkpoints, data, models, trackers
from fnscale.atomic import atomic_dir, write_json
from fnscale.config import TrainConfig
from fnscale.distributed import check_quantized_launch, make_accelerator, zero3_init_disabled, zero_stage
from fnscale.errors import RunError, UsageError
from fnscale.metrics import MetricsLog

log = logging.getLogger(__name__)


class StopRequested:
    """SIGTERM/SIGUSR1 (SLURM pre-emption) set a flag; the loop checkpoints and exits cleanly at the next step."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %s: checkpointing and exiting", signal.Signals(signum).name)
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if it is true on one, so all ranks take the same branch."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0) if accelerator.num_processes > 1 else flag


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


def build_model(cfg: TrainConfig, accelerator):
    """Tokenizer and model (with LoRA/QLoRA when asked); the main process converts GGUF first."""
    with accelerator.main_process_first():
        source = models.resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = models.load_tokenizer(source, cfg.trust_remote_code)
    dtype = models.resolve_dtype(cfg.dtype, accelerator.device)
    quant = models.quantization_config(cfg.load_in_4bit, cfg.load_in_8bit, accelerator.device, dtype)
    if quant is not None and not cfg.lora:
        raise UsageError("--load-in-4bit/--load-in-8bit train an adapter; drop --no-lora")
    if quant is not None:  # 8-bit + ZeRO-3, 4-bit storage dtype vs DeepSpeed's bf16/fp16 cast
        check_quantized_launch(accelerator, cfg.load_in_4bit, cfg.load_in_8bit, dtype)
    device_map = {"": accelerator.device} if quant is not None and zero_stage(accelerator) != 3 else None
    model = models.load_model(source, dtype, quant, cfg.trust_remote_code, device_map=device_map)
    if dtype == torch.float16 and not quant:
        # fp16 master weights diverge under AdamW; keep trainable weights in fp32, autocast does the rest.
        model = model.float()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] if cfg.lora_target_modules else None
        model = models.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, quant is not None, cfg.gradient_checkpointing)
    return source, tokenizer, model


def evaluate_loss(model, loader, accelerator) -> float:
    """Mean loss per response token over the validation set (padding and prompts excluded), all ranks."""
    from fnscale.evaluate import nll_sum

    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # NLL sum, token count
    for batch in loader:
        nll, n = nll_sum(model, batch, accelerator.device)
        sums += torch.tensor([nll, n], dtype=torch.float64, device=accelerator.device)
    model.train()
    total, count = accelerator.reduce(sums, reduction="sum").tolist()
    return total / count if count > 0 else float("nan")


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


def save_final(accelerator, model, tokenizer, cfg: TrainConfig) -> dict[str, str]:
    """The adapter (LoRA) or the full model, consolidated from ZeRO shards, as safetensors; optionally merged."""
    out = Path(cfg.output_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; collective on every rank
    unwrapped = accelerator.unwrap_model(model)
    paths = {}
    if accelerator.is_main_process:
        if state_dict is None or not state_dict:
            raise RunError("the gathered model state is empty; with ZeRO-3 set zero3_save_16bit_model: true in the DeepSpeed config")
        with atomic_dir(out / "final") as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        paths["final"] = str(out / "final")
        if cfg.lora and cfg.merge_adapter:
            with zero3_init_disabled(accelerator):  # only this rank loads the base: no collective ZeRO-3 partitioning
                paths["merged"] = str(merge_adapter(cfg, out / "final", out / "merged"))
    accelerator.wait_for_everyone()
    return paths


def merge_adapter(cfg: TrainConfig, adapter_dir: Path, target: Path) -> Path:
    """Reload the base in full precision and merge the saved adapter: merging into 4-bit weights would lose it."""
    from peft import PeftModel

    source = models.resolve_model(cfg.model, cfg.gguf_file)
    base = models.load_model(source, models.DTYPES.get(cfg.dtype, torch.float32), None, cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        models.load_tokenizer(source).save_pretrained(tmp)
    return target


def train(cfg: TrainConfig) -> dict:
    """Run SFT as configured; returns the run summary (also written to output_dir/summary.json)."""
    validate(cfg)
    for source in (cfg.dataset, cfg.validation_dataset, *cfg.eval_retention):
        data.check_source(source)
    out = Path(cfg.output_dir)
    log_with = trackers.log_with(cfg.report_to, out)
    accelerator = make_accelerator(cfg.gradient_accumulation_steps, str(out), log_with, max_grad_norm=cfg.max_grad_norm)
    _check_writable(out, accelerator)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    source, tokenizer, model = build_model(cfg, accelerator)
    sft = data.build_sft_data(
        tokenizer, cfg.dataset or data.DEFAULT_DATASET, cfg.max_seq_length, cfg.schema, cfg.template, cfg.validation_split,
        cfg.seed, cfg.validation_dataset, cfg.prompt_column, cfg.response_column, cfg.max_samples, train_on_inputs=cfg.train_on_inputs,
    )

    masker = None
    if cfg.mask_mode != "none":
        from fnscale.mask_setup import setup_masks

        masker = setup_masks(cfg, model, tokenizer, sft, accelerator, source.display_name)

    collate = partial(data.collate, pad_id=tokenizer.pad_token_id)
    train_dl = DataLoader(sft.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=False)
    val_dl = DataLoader(sft.validation, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate) if sft.validation else None
    steps_per_epoch = max(1, math.ceil(len(train_dl) / accelerator.num_processes / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.num_epochs))

    from transformers import get_scheduler

    no_decay = masker.no_decay_params() if masker is not None else None
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, no_decay)
    # The prepared scheduler steps once per process per optimizer step (Accelerate's convention), so scale its length.
    n_proc = accelerator.num_processes
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps) * n_proc, num_training_steps=total_steps * n_proc)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    if val_dl is not None:
        val_dl = accelerator.prepare(val_dl)
    retention, retention_before = None, None
    if cfg.eval_retention:  # measured on the unmasked base, before masks and before any resume
        from fnscale.evaluate import RetentionProbe

        retention = RetentionProbe(cfg.eval_retention, tokenizer, cfg.max_seq_length, cfg.batch_size)
        retention_before = retention.measure(accelerator.unwrap_model(model), accelerator, prefix="retention_before")
    if masker is not None:
        masker.attach(accelerator.unwrap_model(model))

    # Resume: the newest loadable checkpoint; a corrupt one is skipped with a warning.
    step, epoch, batches_done = 0, 0, 0
    for ckpt in checkpoints.resolve_resume(cfg.resume_from_checkpoint, out):
        try:
            accelerator.load_state(str(ckpt))
        except Exception as err:  # a truncated or corrupt file
            log.warning("cannot load checkpoint %s (%s); trying the previous one", ckpt, type(err).__name__)
            continue
        st = checkpoints.read_state(ckpt)
        step, epoch, batches_done = st["step"], st["epoch"], st["batches_in_epoch"]
        accelerator.print(f"resumed from {ckpt} at step {step}")
        break
    else:
        if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "auto":
            raise UsageError(f"could not load checkpoint {cfg.resume_from_checkpoint}")

    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if cfg.resume_from_checkpoint else None) if accelerator.is_main_process else None
    if log_with:
        accelerator.init_trackers(trackers.PROJECT, config=_tracker_config(cfg))
    _log(accelerator, metrics, {"step": step, "examples": sft.counts})
    if retention_before is not None:
        _log(accelerator, metrics, {"step": step, **retention_before})
    if masker is not None:
        _log(accelerator, metrics, {"step": step, **masker.stats()})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)
    model.train()
    bad_in_row, last_loss, last_eval, start, tokens_total = 0, float("nan"), None, time.time(), 0
    window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.time()}
    stopped_by_signal = False
    with StopRequested() as stop:
        while step < total_steps:
            train_dl.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
            for batch in loader:
                batches_done += 1
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    bad = _any_rank(accelerator, not torch.isfinite(loss).item())
                    if not bad:
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = None
                        if not bad and cfg.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                                bad = True
                        if bad:
                            optimizer.zero_grad(set_to_none=True)
                        else:
                            optimizer.step()
                            scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                            if masker is not None:
                                masker.after_step()
                if not accelerator.sync_gradients:
                    if not bad:
                        window["loss"] += float(loss.detach())
                        window["n"] += 1
                        window["tokens"] += int(batch["attention_mask"].sum())
                    continue
                if bad:
                    bad_in_row += 1
                    log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step + 1, bad_in_row)
                    if bad_in_row >= cfg.max_bad_steps:
                        raise RunError(f"{bad_in_row} non-finite steps in a row; lower --learning-rate or use --dtype float32/bfloat16 (last good checkpoint kept)")
                    continue
                bad_in_row = 0
                window["loss"] += float(loss.detach())
                window["n"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                step += 1
                bar.update(1)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    elapsed = time.time() - window["t0"]
                    tokens = int(accelerator.reduce(torch.tensor(window["tokens"], device=accelerator.device), reduction="sum"))
                    tokens_total += tokens
                    mean = torch.tensor(window["loss"] / max(1, window["n"]), device=accelerator.device)
                    last_loss = float(accelerator.reduce(mean, reduction="mean"))  # averaged over ranks
                    record = {
                        "step": step, "epoch": round(epoch + batches_done / max(1, len(train_dl)), 4), "loss": last_loss,
                        "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "step_time_s": elapsed / max(1, cfg.logging_steps),
                    }
                    _log(accelerator, metrics, record)
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.time()}
                if val_dl is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < total_steps:
                    last_eval = evaluate_loss(model, val_dl, accelerator)
                    _log(accelerator, metrics, {"step": step, "eval_loss": last_eval})
                stop_now = _any_rank(accelerator, stop.flag)
                if (cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps) or stop_now:
                    save_checkpoint(accelerator, cfg, {"step": step, "epoch": epoch, "batches_in_epoch": batches_done, "loss": last_loss})
                if stop_now:
                    stopped_by_signal = True
                    break
                if step >= total_steps:
                    break
            if stopped_by_signal or step >= total_steps:
                break
            epoch, batches_done = epoch + 1, 0
    bar.close()

    summary = {"steps": step, "total_steps": total_steps, "final_loss": last_loss, "model": source.display_name, "output_dir": str(out),
               "examples": sft.counts}
    if stopped_by_signal:
        summary["stopped"] = "signal"
        accelerator.print(f"stopped by signal at step {step}; checkpoint saved, resume with --resume-from-checkpoint auto")
        accelerator.end_training()
        return summary
    if val_dl is not None:
        last_eval = evaluate_loss(model, val_dl, accelerator)
        _log(accelerator, metrics, {"step": step, "eval_loss": last_eval})
        summary["eval_loss"] = last_eval
    if masker is not None:
        masker.remove()  # the saved model runs unmasked, and so is the retention measured below
    if retention is not None:
        after = retention.measure(accelerator.unwrap_model(model), accelerator, prefix="retention_after")
        _log(accelerator, metrics, {"step": step, **after})
        summary.update(after)
    summary.update(save_final(accelerator, model, tokenizer, cfg))
    summary["train_time_s"] = round(time.time() - start, 2)
    summary["tokens_per_s"] = round(tokens_total / max(1e-9, summary["train_time_s"]), 1)
    if accelerator.is_main_process:
        write_json(out / "summary.json", {**summary, "config": _tracker_config(cfg)})
        if cfg.push_to_hub:
            from fnscale.hub import push_folder

            summary["hub_url"] = push_folder(Path(summary.get("merged") or summary["final"]), cfg.hub_repo_id, cfg.hub_private)
    accelerator.end_training()
    return summary


def validate(cfg: TrainConfig) -> None:
    """Cheap checks before anything heavy is loaded."""
    if cfg.push_to_hub and not cfg.hub_repo_id:
        raise UsageError("--push-to-hub needs --hub-repo-id (e.g. me/my-model)")
    for name in ("batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.learning_rate <= 0:
        raise UsageError("--learning-rate must be positive")
    if cfg.mask_mode == "none" and (cfg.ica_template_path or cfg.ica_component_ids):
        raise UsageError("--ica-template-path/--ica-component-ids need --mask-mode lesion or preserve")
    if not 0 < cfg.ica_percentile < 100:
        raise UsageError(f"--ica-percentile {cfg.ica_percentile} must be between 0 and 100 (exclusive)")


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


def _log(accelerator, metrics: MetricsLog | None, record: dict) -> None:
    if metrics is not None:
        metrics.write(record)
    scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v)}
    if scalars and accelerator.trackers:
        accelerator.log(scalars, step=record["step"])
