"""Run configuration as plain data: one dataclass per command, read from YAML and overridden by CLI flags.

Each field's metadata (`help`, optional `choices`, `flag`) drives the Click options, so a field is
declared once and shows up in `--help` with its default. This module imports no torch: `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fnscale.data.schemas import SCHEMAS
from fnscale.errors import UsageError

SITES = ("intermediate", "mlp_output")  # where an MLP's neurons are read and masked: down-projection input, MLP output
DTYPES = ["auto", "float32", "bfloat16", "float16"]
PRECISIONS = ("auto", "bf16-mixed", "fp16-mixed", "bf16-true", "fp32")  # --precision, see loading.precision_plan
PCA_BACKENDS = ("auto", "cuml", "torch", "numpy")  # numpy: float64 on the CPU
PCA_BACKEND_ALIASES = {"sklearn": "numpy"}  # the numpy backend's former name, still accepted
CL_METRICS = ("token_accuracy", "exact_match")  # scores the continual-learning matrix R can hold
MASK_EFFECTS = ("update", "forward")  # how a mask acts in training: frozen weights, or zeroed activations
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # --attn-implementation (see attention.py)
DEVICE_MAPS = ("auto",)  # --device-map: one process, the model split over this node's devices (see placement.py)


def opt(default, help: str, choices=None, flag: str | None = None, secondary: str | None = None):
    """A config field with the metadata the CLI needs."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "secondary": secondary})


@dataclass
class TrainConfig:
    # model
    model: str | None = opt(None, "HF hub id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    gguf_file: str | None = opt(None, "GGUF file name inside --model (a folder or hub repo)")
    dtype: str = opt("auto", "half-precision dtype (auto: bf16 on CUDA, fp16 where bf16 is unsupported, fp32 "
                     "elsewhere); see --precision", DTYPES)
    precision: str = opt("auto", "auto (from --dtype): bf16-mixed/fp16-mixed keep fp32 trainable weights under "
                         "autocast (fp16 adds a GradScaler; LoRA loads the frozen base in half precision); bf16-true "
                         "trains bf16 weights; fp32 uses no autocast", list(PRECISIONS))
    trust_remote_code: bool = opt(False, "allow custom model code from the hub (off by default: it runs arbitrary code)")
    attn_implementation: str = opt("auto", "attention kernel (auto: flash_attention_2 on CUDA with --packing when flash-attn is installed, "
                                   "else sdpa)", list(ATTN_IMPLEMENTATIONS))
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
    packing: bool = opt(False, "padding-free: pack whole examples into rows of --max-seq-length tokens (attention stays inside each example)")
    group_by_length: bool = opt(False, "batch examples of similar length together (seeded), so less of each batch is padding")
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
    ica_site: str = opt("intermediate", "capture site for computed templates", list(SITES))
    mask_kernel: str = opt("auto", "masking path: auto (Triton on CUDA), triton or torch", ["auto", "triton", "torch"])
    compact: str = opt("auto", "compact preserve: compute the MLP over kept neurons only (auto: preserve with < 50% kept)", ["auto", "on", "off"])
    mask_effect: str | None = opt(None, "how masks act: update (masked neurons stay in the forward pass, their weights get no update; "
                                  "the default with --mask-mode) or forward (their activations are zeroed during training only)", list(MASK_EFFECTS))
    train_attention: bool = opt(True, "train attention, embeddings, norms and the LM head (--no-train-attention: only MLP weights train)",
                                flag="--train-attention/--no-train-attention")
    mask_control: str = opt("none", "random: mask as many neurons per layer as the chosen networks, drawn at random (a chance baseline)",
                            ["none", "random"])
    mask_control_seed: int | None = opt(None, "seed of the --mask-control random draw (default: --seed)")
    optimizer_slices: str = opt("auto", "with --mask-effect update and full fine-tuning (one device or DDP): freeze the masked layers' dense MLP "
                                "weights and train deltas of the trained slices only, so AdamW keeps state for those alone (auto: when "
                                "under 50% of their neurons are kept; not under ZeRO)", ["auto", "on", "off"])
    # evaluation
    eval_retention: tuple[str, ...] = opt((), "retention data to evaluate before and after training (repeatable)")
    # distribution
    ddp_timeout: int = opt(1800, "seconds a rank waits in a collective for a live but silent peer (a dead peer or a failed save is noticed at once)")


@dataclass
class TemplatesBuildConfig:
    """`fnscale templates build`: MODEL and DATASETs may also come as positional arguments (see cli_templates)."""

    model: str | None = opt(None, "model id, folder or .gguf (instead of the MODEL argument); default: the embedded SmolLM2")
    dataset: tuple[str, ...] = opt((), "data file or hub dataset (instead of DATASET arguments); default: bundled sample data")
    samples_per_dataset: int = opt(100, "examples drawn from each dataset")
    schema: str = opt("auto", "column schema of the data (auto: detected, see README)", list(SCHEMAS))
    prompt_column: str | None = opt(None, "custom prompt column(s), comma-separated ones joined into the user turn (with --response-column)")
    response_column: str | None = opt(None, "custom response column (with --prompt-column)")
    template: str = opt("auto", "prompt format as in training: the tokenizer's chat template (auto, when it has one) or a plain one", ["auto", "chat", "plain"])
    components: int = opt(10, "number of ICA components (functional networks)")
    percentile: float = opt(98.0, "loading percentile a neuron must pass (98 keeps ~2%)")
    site: str = opt("intermediate", "capture site: down-projection input or MLP output", list(SITES))
    layers: str | None = opt(None, "layers to capture, e.g. 0-7,12 (default: all)")
    scope: str = opt("global", "one decomposition over all layers, or one per layer", ["global", "layer"])
    ica_kind: str = opt("temporal", "temporal ICA (the paper's) or spatial ICA", ["temporal", "spatial"])
    pca_backend: str = opt(
        "auto",
        "PCA backend (auto: cuML, then torch on CUDA, then numpy on the CPU; sklearn: an alias of numpy)",
        [*PCA_BACKENDS, *PCA_BACKEND_ALIASES],
    )
    output: str = opt("ica_templates", "output folder for global_templates.json, coverage.txt and coverage.png")
    max_seq_length: int = opt(512, "truncate samples to this many tokens")
    batch_size: int = opt(8, "samples per forward pass")
    dtype: str = opt("auto", "model dtype", DTYPES)
    cache_budget_gb: str = opt(
        "auto", "keep the captured activations in memory (fp16, per-neuron scaled) to skip recomputing the forward pass: "
        "auto caches when they fit in half the available memory, a number is a budget in GB per process, 0 streams"
    )
    seed: int = opt(0, "seed for sampling and FastICA")
    gguf_file: str | None = opt(None, "GGUF file inside MODEL")
    trust_remote_code: bool = opt(False, "allow custom model code from the hub")
    # one process, several devices (see fnscale/placement.py)
    device_map: str | None = opt(None, "auto: split the model over this node's GPUs, then CPU, then disk (one process, no accelerate launch)",
                                 list(DEVICE_MAPS))
    max_memory: str | None = opt(None, "with --device-map auto: per-device caps, e.g. 0=20GiB,cpu=64GiB, or a JSON/YAML file of that mapping")
    offload_folder: str | None = opt(None, "with --device-map auto: folder for layers offloaded to disk")
    # distribution
    ddp_timeout: int = opt(1800, "seconds a rank waits in a collective for a live but silent peer (under accelerate launch)")


@dataclass
class EvalConfig:
    # models
    model: str | None = opt(None, "base model: HF id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    gguf_file: str | None = opt(None, "GGUF file name inside --model (a folder or hub repo); default: none")
    adapter: tuple[str, ...] = opt((), "PEFT adapter folder to load onto the base model; default: none")
    finetuned: tuple[str, ...] = opt((), "full fine-tuned model folder (same tokenizer as the base); default: none")
    sequence: str | None = opt(
        None, "continual-learning run: YAML/JSON list of {task, checkpoint} in training order; replaces --task/--adapter/--finetuned; default: none"
    )
    # task data
    task: str | None = opt(None, "task data: file, folder or glob (.json/.jsonl/.csv/.parquet, .gz too) or hub NAME[:CONFIG[:SPLIT]]; "
                              "default: the bundled sample data")
    task_split: str = opt("validation", "task examples scored: validation (held out as training split it), train, or all", ["validation", "train", "all"])
    validation_split: float = opt(0.05, "held-out share, as in training (must match the training run's to be held out)")
    schema: str = opt("auto", "column schema of the task data", list(SCHEMAS))
    template: str = opt("auto", "prompt format (as in training)", ["auto", "chat", "plain"])
    prompt_column: str | None = opt(None, "custom prompt column(s), comma-separated ones joined (with --response-column); default: from --schema")
    response_column: str | None = opt(None, "custom response column (with --prompt-column); default: from --schema")
    max_samples: int | None = opt(None, "use only the first N records of each data file; default: all")
    # retention
    retention: tuple[str, ...] = opt(
        (), "retention corpus (.txt, data with a `text` column, or SFT data: all tokens scored); default: the bundled retention.txt; `none` skips"
    )
    # generation
    generate: int = opt(32, "greedy generations per task scored for exact match and token accuracy (0: none)")
    cl_metric: str = opt("token_accuracy", "score in the continual-learning matrix R", list(CL_METRICS))
    lm_eval_tasks: str | None = opt(None, "comma-separated lm-eval harness tasks (needs `pip install lm-eval` and reachable data); default: none")
    lm_eval_limit: int | None = opt(None, "examples per lm-eval task; default: all")
    # runtime
    max_seq_length: int = opt(512, "truncate task examples (keeping the response) and chunk retention text to this many tokens")
    batch_size: int = opt(8, "sequences per forward pass")
    seed: int = opt(42, "seed for the held-out split and the choice of generated examples")
    dtype: str = opt("auto", "weights dtype (auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU)", DTYPES)
    device: str = opt("auto", "device (auto: CUDA > MPS > CPU), e.g. cpu or cuda:1")
    trust_remote_code: bool = opt(False, "allow custom model code from the hub (off by default: it runs arbitrary code)")
    output: str = opt("runs/eval", "folder for report.json, report.md, the plot and TensorBoard scalars")
    # one process, several devices (see fnscale/placement.py)
    device_map: str | None = opt(None, "auto: split the model over this node's GPUs, then CPU, then disk (one process, no accelerate launch)",
                                 list(DEVICE_MAPS))
    max_memory: str | None = opt(None, "with --device-map auto: per-device caps, e.g. 0=20GiB,cpu=64GiB, or a JSON/YAML file of that mapping")
    offload_folder: str | None = opt(None, "with --device-map auto: folder for layers offloaded to disk")


def read_yaml(path: str | Path, what: str = "config file"):
    """The parsed YAML (or JSON, a subset of YAML) of `path`; a missing or malformed file is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} not found; fix the path")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: malformed YAML/JSON: {str(err).splitlines()[0]}") from err


def load_yaml(path: str | Path) -> dict:
    """A config file's options as {field_name: value} (dashes in keys read as underscores)."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def merge(cls, yaml_values: dict, cli_values: dict, cli_explicit: set[str], command: str = "train"):
    """Defaults < YAML < flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(yaml_values) - names)
    if unknown:
        raise UsageError(f"unknown option(s) in config file: {', '.join(unknown)}; see `fnscale {command} --help`")
    values = {k: v for k, v in cli_values.items() if k in names}
    for k, v in yaml_values.items():
        if k not in cli_explicit:
            values[k] = tuple(v) if isinstance(v, list) else v
    return cls(**values)
