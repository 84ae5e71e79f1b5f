"""Run configuration as plain data: one dataclass per command, read from YAML and overridden by CLI flags.

Each field's metadata (`help`, optional `choices`, `flag`) drives the Click options, so a field is
declared once and shows up in `--help` with its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fnscale.data.schemas import SCHEMAS
from fnscale.errors import UsageError


def opt(default, help: str, choices=None, flag: str | None = None, secondary: str | None = None):
    """A config field with the metadata the CLI needs."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "secondary": secondary})


@dataclass
class TrainConfig:
    # model
    model: str | None = opt(None, "HF hub id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    gguf_file: str | None = opt(None, "GGUF file name inside --model (a folder or hub repo)")
    dtype: str = opt("auto", "weights dtype (auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU)", ["auto", "float32", "bfloat16", "float16"])
    trust_remote_code: bool = opt(False, "allow custom model code from the hub (off by default: it runs arbitrary code)")
    # data
    dataset: tuple[str, ...] = opt((), "SFT data: file, folder or glob of .json/.jsonl/.csv/.parquet (.gz too), or hub NAME[:CONFIG[:SPLIT]]; "
                                   "a trailing :WEIGHT scales how many of its examples are used (old.jsonl:0.2), or a .yaml list of "
                                   "{path, weight, schema, columns}; default: bundled sample data")
    validation_dataset: str | None = opt(None, "held-out data; default: split off --validation-split of --dataset")
    validation_split: float = opt(0.05, "share of each --dataset held out for evaluation when there is no --validation-dataset")
    schema: str = opt("auto", "column schema (auto: detected, see README)", list(SCHEMAS))
    prompt_column: str | None = opt(None, "custom prompt column(s), comma-separated ones joined into the user turn (with --response-column)")
    response_column: str | None = opt(None, "custom response column (with --prompt-column)")
    train_on_inputs: bool = opt(False, "train on every token, prompts included (default: only the assistant turns)")
    template: str = opt("auto", "prompt format: the tokenizer's chat template (auto, when it has one) or a plain one", ["auto", "chat", "plain"])
    max_seq_length: int = opt(512, "truncate examples to this many tokens, keeping the response")
    max_samples: int | None = opt(None, "use only the first N examples of --dataset")
    # output
    output_dir: str = opt("runs/fnscale", "where checkpoints, the final model, TensorBoard events and metrics.jsonl go")
    # fine-tuning kind
    lora: bool = opt(True, "train a LoRA adapter (--no-lora: full fine-tuning)", flag="--lora/--no-lora")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target_modules: str | None = opt(None, "comma-separated module names; default: chosen per architecture")
    load_in_4bit: bool = opt(False, "QLoRA: load the base model in 4-bit NF4 (bitsandbytes)")
    load_in_8bit: bool = opt(False, "load the base model in 8-bit (bitsandbytes)")
    merge_adapter: bool = opt(False, "also save the base model with the adapter merged in (output_dir/merged)")
    gradient_checkpointing: bool = opt(False, "trade compute for activation memory")
    # optimisation
    learning_rate: float = opt(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms)")
    lr_scheduler: str = opt("cosine", "schedule after warmup", ["cosine", "linear", "constant"])
    warmup_ratio: float = opt(0.03, "share of steps spent warming up")
    batch_size: int = opt(4, "examples per device per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    num_epochs: float = opt(1.0, "passes over the data (ignored when --max-steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to run (overrides --num-epochs when > 0)")
    seed: int = opt(42, "random seed for data order, splits and initialisation")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row")
    # monitoring and checkpoints
    logging_steps: int = opt(1, "log every N optimizer steps")
    eval_steps: int = opt(50, "evaluate every N steps (0: only at the end)")
    save_steps: int = opt(50, "checkpoint every N steps (0: no intermediate checkpoints)")
    save_total_limit: int = opt(2, "keep at most N checkpoints")
    resume_from_checkpoint: str | None = opt(None, "checkpoint folder to resume from, or `auto` for the latest in --output-dir")
    report_to: str = opt("tensorboard", "metrics trackers, comma-separated: tensorboard, wandb, mlflow, or none")
    # hub
    push_to_hub: bool = opt(False, "upload the final output to the hub (needs --hub-repo-id)")
    hub_repo_id: str | None = opt(None, "hub repo id, e.g. me/my-model")
    hub_private: bool = opt(False, "create the hub repo as private")
    # functional-network masking
    ica_template_path: str | None = opt(None, "templates JSON (fnscale or FunctionalNetworksSFT global_templates.json)")
    mask_mode: str = opt("none", "lesion: zero the chosen networks; preserve: train only them", ["none", "lesion", "preserve"])
    ica_component_ids: str | None = opt(None, "comma-separated component ids to mask, e.g. 0,3")
    ica_layers: str | None = opt(None, "restrict masks to these layers, e.g. 0-7,12")
    ica_components: int = opt(10, "components to compute when no --ica-template-path is given")
    ica_percentile: float = opt(98.0, "loading percentile a neuron must pass to join a network")
    ica_samples: int = opt(64, "training examples used to compute templates when none are given")
    ica_site: str = opt("intermediate", "capture site for computed templates", ["intermediate", "mlp_output"])
    mask_kernel: str = opt("auto", "masking path: auto (Triton on CUDA), triton or torch", ["auto", "triton", "torch"])
    compact: str = opt("auto", "compact preserve: compute the MLP over kept neurons only (auto: preserve with < 50% kept)", ["auto", "on", "off"])
    # evaluation
    eval_retention: tuple[str, ...] = opt((), "retention data to evaluate before and after training (repeatable)")
    debug: bool = opt(False, "show tracebacks")


def config_fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def merge(cls, yaml_values: dict, cli_values: dict, cli_explicit: set[str]):
    """Defaults < YAML < flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(yaml_values) - names)
    if unknown:
        raise UsageError(f"unknown option(s) in config file: {', '.join(unknown)}; see `fnscale train --help`")
    values = {k: v for k, v in cli_values.items() if k in names}
    for k, v in yaml_values.items():
        if k not in cli_explicit:
            values[k] = tuple(v) if isinstance(v, list) else v
    return cls(**values)
