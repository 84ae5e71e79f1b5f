"""Run configuration as plain data: one dataclass per command, read from YAML and overridden by CLI flags.

Each field's metadata (`help`, optional `choices`, `flag`, `limits`) drives the Click options, so a field is
declared once and shows up in `--help` with its default. A config-file value goes through the same Click type,
choices and limits as its flag (`value_of`), so `learning_rate: 1e-4` (a string to YAML) works and `dtype: fp16`
is refused, naming the file, the line and the key. This module imports no torch: `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import click
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


@dataclass(frozen=True)
class Limits:
    """Bounds of a number option, checked for flags and config-file values alike."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the bound itself is refused
    high_open: bool = False

    def problem(self, value) -> str | None:
        """Why `value` is out of bounds, or None."""
        lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        hi_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (lo_bad or hi_bad):
            return None
        if self.low is not None and self.high is not None:
            edges = {
                (True, True): " (exclusive)",
                (False, True): f" ({self.high:g} excluded)",
                (True, False): f" ({self.low:g} excluded)",
            }
            return f"must be between {self.low:g} and {self.high:g}{edges.get((self.low_open, self.high_open), '')}"
        if self.low is not None:
            return f"must be {'greater than' if self.low_open else 'at least'} {self.low:g}"
        return f"must be {'less than' if self.high_open else 'at most'} {self.high:g}"


AT_LEAST_1 = Limits(1)
NON_NEGATIVE = Limits(0)
POSITIVE = Limits(0, low_open=True)
PERCENTILE = Limits(0, 100, low_open=True, high_open=True)
SHARE = Limits(0, 1, high_open=True)  # a held-out share: 0 (none) up to, not including, everything
RATIO = Limits(0, 1)


def opt(
    default,
    help: str,
    choices=None,
    flag: str | None = None,
    secondary: str | None = None,
    limits: Limits | None = None,
):
    """A config field with the metadata the CLI needs."""
    meta = {"help": help, "choices": choices, "flag": flag, "secondary": secondary, "limits": limits}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model
    model: str | None = opt(None, "HF hub id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    gguf_file: str | None = opt(None, "GGUF file name inside --model (a folder or hub repo)")
    dtype: str = opt(
        "auto",
        "half-precision dtype (auto: bf16 on CUDA, fp16 where bf16 is unsupported, fp32 elsewhere); see --precision",
        DTYPES,
    )
    precision: str = opt(
        "auto",
        "auto (from --dtype): bf16-mixed/fp16-mixed keep fp32 trainable weights under "
        "autocast (fp16 adds a GradScaler; LoRA loads the frozen base in half precision); bf16-true "
        "trains bf16 weights; fp32 uses no autocast",
        list(PRECISIONS),
    )
    trust_remote_code: bool = opt(
        False, "allow custom model code from the hub (off by default: it runs arbitrary code)"
    )
    attn_implementation: str = opt(
        "auto",
        "attention kernel (auto: flash_attention_2 on CUDA with --packing when flash-attn is installed, else sdpa)",
        list(ATTN_IMPLEMENTATIONS),
    )
    # data
    dataset: tuple[str, ...] = opt(
        (),
        "SFT data: file, folder or glob of .json/.jsonl/.csv/.parquet/.txt (.gz too; .txt: blank-line separated plain "
        "texts, every token trained), or hub NAME[:CONFIG[:SPLIT]]; "
        "a trailing :WEIGHT scales how many of its examples are used (old.jsonl:0.2), or a .yaml list of "
        "{path, weight, schema, columns}; default: bundled sample data",
    )
    validation_dataset: str | None = opt(
        None, "held-out data (the same kinds as --dataset); default: split off --validation-split of --dataset"
    )
    validation_split: float = opt(
        0.05, "share of each --dataset held out for evaluation when there is no --validation-dataset", limits=SHARE
    )
    schema: str = opt("auto", "column schema (auto: detected, see README)", list(SCHEMAS))
    prompt_column: str | None = opt(
        None, "custom prompt column(s), comma-separated ones joined into the user turn (with --response-column)"
    )
    response_column: str | None = opt(None, "custom response column (with --prompt-column)")
    train_on_inputs: bool = opt(False, "train on every token, prompts included (default: only the assistant turns)")
    template: str = opt(
        "auto",
        "prompt format: the tokenizer's chat template (auto, when it has one) or a plain one",
        ["auto", "chat", "plain"],
    )
    max_seq_length: int = opt(512, "truncate examples to this many tokens, keeping the response", limits=AT_LEAST_1)
    max_samples: int | None = opt(None, "use only the first N examples of --dataset", limits=AT_LEAST_1)
    packing: bool = opt(
        False,
        "padding-free: pack whole examples into rows of --max-seq-length tokens (attention stays inside each example)",
    )
    group_by_length: bool = opt(
        False, "batch examples of similar length together (seeded), so less of each batch is padding"
    )
    # output
    output_dir: str = opt("runs/fnscale", "where checkpoints, the final model, TensorBoard events and metrics.jsonl go")
    # fine-tuning kind
    lora: bool = opt(True, "train a LoRA adapter (--no-lora: full fine-tuning)", flag="--lora/--no-lora")
    lora_r: int = opt(16, "LoRA rank", limits=AT_LEAST_1)
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout", limits=Limits(0, 1, high_open=True))
    lora_target_modules: str | None = opt(None, "comma-separated module names; default: chosen per architecture")
    load_in_4bit: bool = opt(False, "QLoRA: load the base model in 4-bit NF4 (bitsandbytes)")
    load_in_8bit: bool = opt(False, "load the base model in 8-bit (bitsandbytes)")
    merge_adapter: bool = opt(False, "also save the base model with the adapter merged in (output_dir/merged)")
    gradient_checkpointing: bool = opt(False, "trade compute for activation memory")
    # optimisation
    learning_rate: float = opt(2e-4, "peak learning rate (AdamW)", limits=POSITIVE)
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms)", limits=NON_NEGATIVE)
    lr_scheduler: str = opt("cosine", "schedule after warmup", ["cosine", "linear", "constant"])
    warmup_ratio: float = opt(0.03, "share of steps spent warming up", limits=RATIO)
    batch_size: int = opt(4, "examples per device per micro-batch", limits=AT_LEAST_1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", limits=AT_LEAST_1)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", limits=NON_NEGATIVE)
    num_epochs: float = opt(1.0, "passes over the data (ignored when --max-steps > 0)", limits=POSITIVE)
    max_steps: int = opt(-1, "optimizer steps to run (overrides --num-epochs when > 0)")
    seed: int = opt(42, "random seed for data order, splits and initialisation")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row", limits=AT_LEAST_1)
    # monitoring and checkpoints
    logging_steps: int = opt(1, "log every N optimizer steps", limits=AT_LEAST_1)
    eval_steps: int = opt(50, "evaluate every N steps (0: only at the end)", limits=NON_NEGATIVE)
    save_steps: int = opt(50, "checkpoint every N steps (0: no intermediate checkpoints)", limits=NON_NEGATIVE)
    save_total_limit: int = opt(2, "keep at most N checkpoints")
    resume_from_checkpoint: str | None = opt(
        None, "checkpoint folder to resume from, or `auto` for the latest in --output-dir"
    )
    report_to: str = opt("tensorboard", "metrics trackers, comma-separated: tensorboard, wandb, mlflow, or none")
    # hub
    push_to_hub: bool = opt(False, "upload the final output to the hub (needs --hub-repo-id)")
    hub_repo_id: str | None = opt(None, "hub repo id, e.g. me/my-model")
    hub_private: bool = opt(False, "create the hub repo as private")
    # functional-network masking
    ica_template_path: str | None = opt(None, "templates JSON (fnscale or FunctionalNetworksSFT global_templates.json)")
    mask_mode: str = opt(
        "none", "lesion: zero the chosen networks; preserve: train only them", ["none", "lesion", "preserve"]
    )
    ica_component_ids: str | None = opt(None, "comma-separated component ids to mask, e.g. 0,3")
    ica_layers: str | None = opt(None, "restrict masks to these layers, e.g. 0-7,12")
    ica_components: int = opt(10, "components to compute when no --ica-template-path is given", limits=AT_LEAST_1)
    ica_percentile: float = opt(98.0, "loading percentile a neuron must pass to join a network", limits=PERCENTILE)
    ica_samples: int = opt(64, "training examples used to compute templates when none are given", limits=AT_LEAST_1)
    ica_site: str = opt("intermediate", "capture site for computed templates", list(SITES))
    mask_kernel: str = opt("auto", "masking path: auto (Triton on CUDA), triton or torch", ["auto", "triton", "torch"])
    compact: str = opt(
        "auto",
        "compact preserve: compute the MLP over kept neurons only (auto: preserve with < 50% kept)",
        ["auto", "on", "off"],
    )
    mask_effect: str | None = opt(
        None,
        "how masks act: update (masked neurons stay in the forward pass, their weights get no update; "
        "the default with --mask-mode) or forward (their activations are zeroed during training only)",
        list(MASK_EFFECTS),
    )
    train_attention: bool = opt(
        True,
        "train attention, embeddings, norms and the LM head (--no-train-attention: only MLP weights train)",
        flag="--train-attention/--no-train-attention",
    )
    mask_control: str = opt(
        "none",
        "random: mask as many neurons per layer as the chosen networks, drawn at random (a chance baseline)",
        ["none", "random"],
    )
    mask_control_seed: int | None = opt(None, "seed of the --mask-control random draw (default: --seed)")
    optimizer_slices: str = opt(
        "auto",
        "with --mask-effect update and full fine-tuning (one device or DDP): freeze the masked layers' dense MLP "
        "weights and train deltas of the trained slices only, so AdamW keeps state for those alone (auto: when "
        "under 50% of their neurons are kept; not under ZeRO)",
        ["auto", "on", "off"],
    )
    # continual learning (written by `fnscale cl`; see fnscale/continual/ewc.py)
    ewc_state: str | None = opt(
        None,
        "EWC: the accumulated diagonal Fisher of earlier tasks (safetensors); its anchor model's weights are theta*",
    )
    ewc_lambda: float = opt(
        0.0, "EWC strength: adds lambda/2 * sum F (theta - theta*)^2 to the loss (with --ewc-state)"
    )
    # evaluation
    eval_retention: tuple[str, ...] = opt((), "retention data to evaluate before and after training (repeatable)")
    # distribution
    ddp_timeout: int = opt(
        1800,
        "seconds a rank waits in a collective for a live but silent peer (a dead peer or a failed save is noticed at "
        "once)",
    )


@dataclass
class TemplatesBuildConfig:
    """`fnscale templates build`: MODEL and DATASETs may also come as positional arguments (see cli_templates)."""

    model: str | None = opt(
        None, "model id, folder or .gguf (instead of the MODEL argument); default: the embedded SmolLM2"
    )
    dataset: tuple[str, ...] = opt(
        (),
        "data file (.json/.jsonl/.csv/.parquet/.txt, .gz too), folder, glob or hub dataset (instead of DATASET "
        "arguments); default: bundled sample data",
    )
    samples_per_dataset: int = opt(100, "examples drawn from each dataset", limits=AT_LEAST_1)
    schema: str = opt("auto", "column schema of the data (auto: detected, see README)", list(SCHEMAS))
    prompt_column: str | None = opt(
        None, "custom prompt column(s), comma-separated ones joined into the user turn (with --response-column)"
    )
    response_column: str | None = opt(None, "custom response column (with --prompt-column)")
    template: str = opt(
        "auto",
        "prompt format as in training: the tokenizer's chat template (auto, when it has one) or a plain one",
        ["auto", "chat", "plain"],
    )
    components: int = opt(10, "number of ICA components (functional networks)", limits=AT_LEAST_1)
    percentile: float = opt(98.0, "loading percentile a neuron must pass (98 keeps ~2%)", limits=PERCENTILE)
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
    max_seq_length: int = opt(512, "truncate samples to this many tokens", limits=AT_LEAST_1)
    batch_size: int = opt(8, "samples per forward pass", limits=AT_LEAST_1)
    dtype: str = opt("auto", "model dtype", DTYPES)
    cache_budget_gb: str = opt(
        "auto",
        "keep the captured activations in memory (fp16, per-neuron scaled) to skip recomputing the forward pass: "
        "auto caches when they fit in half the available memory, a number is a budget in GB per process, 0 streams",
    )
    seed: int = opt(0, "seed for sampling and FastICA")
    gguf_file: str | None = opt(None, "GGUF file inside MODEL")
    trust_remote_code: bool = opt(False, "allow custom model code from the hub")
    # one process, several devices (see fnscale/placement.py)
    device_map: str | None = opt(
        None,
        "auto: split the model over this node's GPUs, then CPU, then disk (one process, no accelerate launch)",
        list(DEVICE_MAPS),
    )
    max_memory: str | None = opt(
        None, "with --device-map auto: per-device caps, e.g. 0=20GiB,cpu=64GiB, or a JSON/YAML file of that mapping"
    )
    offload_folder: str | None = opt(None, "with --device-map auto: folder for layers offloaded to disk")
    # distribution
    ddp_timeout: int = opt(
        1800, "seconds a rank waits in a collective for a live but silent peer (under accelerate launch)"
    )


@dataclass
class EvalConfig:
    # models
    model: str | None = opt(
        None, "base model: HF id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct"
    )
    gguf_file: str | None = opt(None, "GGUF file name inside --model (a folder or hub repo); default: none")
    adapter: tuple[str, ...] = opt((), "PEFT adapter folder to load onto the base model; default: none")
    finetuned: tuple[str, ...] = opt((), "full fine-tuned model folder (same tokenizer as the base); default: none")
    sequence: str | None = opt(
        None,
        "continual-learning run: YAML/JSON list of {task, checkpoint} in training order; replaces "
        "--task/--adapter/--finetuned; default: none",
    )
    # task data
    task: str | None = opt(
        None,
        "task data: file, folder or glob (.json/.jsonl/.csv/.parquet/.txt, .gz too) or hub NAME[:CONFIG[:SPLIT]]; "
        "default: the bundled sample data",
    )
    task_split: str = opt(
        "validation",
        "task examples scored: validation (held out as training split it), train, or all",
        ["validation", "train", "all"],
    )
    validation_split: float = opt(
        0.05, "held-out share, as in training (must match the training run's to be held out)", limits=SHARE
    )
    schema: str = opt("auto", "column schema of the task data", list(SCHEMAS))
    template: str = opt("auto", "prompt format (as in training)", ["auto", "chat", "plain"])
    prompt_column: str | None = opt(
        None, "custom prompt column(s), comma-separated ones joined (with --response-column); default: from --schema"
    )
    response_column: str | None = opt(None, "custom response column (with --prompt-column); default: from --schema")
    max_samples: int | None = opt(
        None, "use only the first N records of each data file; default: all", limits=AT_LEAST_1
    )
    # retention
    retention: tuple[str, ...] = opt(
        (),
        "retention corpus (.txt, data with a `text` column, or SFT data: all tokens scored); default: the bundled "
        "retention.txt; `none` skips",
    )
    # generation
    generate: int = opt(
        32, "greedy generations per task scored for exact match and token accuracy (0: none)", limits=NON_NEGATIVE
    )
    cl_metric: str = opt("token_accuracy", "score in the continual-learning matrix R", list(CL_METRICS))
    lm_eval_tasks: str | None = opt(
        None, "comma-separated lm-eval harness tasks (needs `pip install lm-eval` and reachable data); default: none"
    )
    lm_eval_limit: int | None = opt(None, "examples per lm-eval task; default: all")
    # runtime
    max_seq_length: int = opt(
        512, "truncate task examples (keeping the response) and chunk retention text to this many tokens"
    )
    batch_size: int = opt(8, "sequences per forward pass", limits=AT_LEAST_1)
    seed: int = opt(42, "seed for the held-out split and the choice of generated examples")
    dtype: str = opt("auto", "weights dtype (auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU)", DTYPES)
    device: str = opt("auto", "device (auto: CUDA > MPS > CPU), e.g. cpu or cuda:1")
    trust_remote_code: bool = opt(
        False, "allow custom model code from the hub (off by default: it runs arbitrary code)"
    )
    output: str = opt("runs/eval", "folder for report.json, report.md, the plot and TensorBoard scalars")
    # one process, several devices (see fnscale/placement.py)
    device_map: str | None = opt(
        None,
        "auto: split the model over this node's GPUs, then CPU, then disk (one process, no accelerate launch)",
        list(DEVICE_MAPS),
    )
    max_memory: str | None = opt(
        None, "with --device-map auto: per-device caps, e.g. 0=20GiB,cpu=64GiB, or a JSON/YAML file of that mapping"
    )
    offload_folder: str | None = opt(None, "with --device-map auto: folder for layers offloaded to disk")


SELECTORS = ("activation", "fisher", "random")  # `templates select --by`


@dataclass
class NetworkDataConfig:
    """The model and data `templates select` and `templates rank` score networks on (data options as in `templates
    build`)."""

    model: str | None = opt(
        None,
        "model id, folder or .gguf; default: the model the networks file names (the embedded SmolLM2 when "
        "it names that or none)",
    )
    gguf_file: str | None = opt(None, "GGUF file inside --model")
    data: tuple[str, ...] = opt(
        (),
        "data to score on: file, folder, glob or hub NAME[:CONFIG[:SPLIT]], as in `templates build`; "
        "default: bundled sample data",
    )
    samples_per_dataset: int = opt(100, "examples drawn from each --data (a seeded choice)", limits=AT_LEAST_1)
    schema: str = opt("auto", "column schema of the data (auto: detected, see README)", list(SCHEMAS))
    prompt_column: str | None = opt(
        None, "custom prompt column(s), comma-separated ones joined into the user turn (with --response-column)"
    )
    response_column: str | None = opt(None, "custom response column (with --prompt-column)")
    template: str = opt(
        "auto",
        "prompt format as in training: the tokenizer's chat template (auto, when it has one) or a plain one",
        ["auto", "chat", "plain"],
    )
    max_seq_length: int = opt(512, "truncate examples to this many tokens", limits=AT_LEAST_1)
    batch_size: int = opt(8, "examples per forward pass", limits=AT_LEAST_1)
    dtype: str = opt("auto", "model dtype", DTYPES)
    device: str = opt("auto", "device (auto: CUDA > MPS > CPU), e.g. cpu or cuda:1")
    trust_remote_code: bool = opt(False, "allow custom model code from the hub")
    seed: int = opt(0, "seed of the data sample and of random draws")


@dataclass
class TemplatesSelectConfig(NetworkDataConfig):
    """`fnscale templates select`: one component of as many neurons per layer as --like's chosen components hold."""

    by: str | None = opt(
        None,
        "activation: highest mean |activation| over the data's tokens; fisher: highest mean squared gradient "
        "of the example's LM loss with respect to a per-neuron gate; random: a seeded draw",
        list(SELECTORS),
    )
    like: str | None = opt(
        None, "networks file whose per-layer counts (and capture site and layers) the selection matches"
    )
    ica_component_ids: str | None = opt(
        None,
        "components of --like whose union per layer sets the counts, e.g. 0,3 or top:3 (a ranked file); default: all",
    )
    share: float | None = opt(
        None,
        "instead of component counts: this share of every captured layer's neurons, e.g. 0.1",
        limits=Limits(0, 1, low_open=True),
    )
    output: str | None = opt(None, "networks JSON file to write")


@dataclass
class TemplatesRankConfig(NetworkDataConfig):
    """`fnscale templates rank`: the rise in loss when each component is lesioned, against size-matched random
    lesions."""

    ica_component_ids: str | None = opt(None, "components to rank, e.g. 0,3; default: all")
    random_draws: int = opt(3, "random lesions per component (same size per layer), averaged", limits=AT_LEAST_1)
    output: str | None = opt(None, "where to write the ranked networks file; default: update the file in place")


def read_yaml(path: str | Path, what: str = "config file"):
    """The parsed YAML (or JSON, a subset of YAML) of `path`; a missing or malformed file is a one-line UsageError."""
    return _read(path, what)[0]


def _read(path: str | Path, what: str) -> tuple[object, yaml.Node | None]:
    """The parsed document and its node tree (whose marks give line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} {'is a folder, not a file' if path.is_dir() else 'not found'}; fix the path")
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            return (loader.construct_document(node) if node is not None else None), node
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}{where}: malformed YAML/JSON: {err.problem or err.context}; fix the file") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: malformed YAML/JSON: {str(err).splitlines()[0]}") from err


def config_file(path: str | Path) -> tuple[dict, dict[str, int]]:
    """A config file's options as {field_name: value} (dashes in keys read as underscores) and each key's line."""
    data, node = _read(path, "config file")
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, e.g. `learning_rate: 1e-4`")
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key = str(key_node.value).replace("-", "_")
        if key in lines:
            line = key_node.start_mark.line + 1
            raise UsageError(f"{path} line {line}: {key} is given twice (first on line {lines[key]}); keep one")
        lines[key] = key_node.start_mark.line + 1
    return {str(k).replace("-", "_"): v for k, v in data.items()}, lines


def keys_of(d, where: str, allowed: set[str], hint: str, noun: str = "key") -> dict:
    """A YAML mapping with dashes normalised to underscores; unknown keys refused in one line ending with `hint`."""
    if not isinstance(d, dict):
        raise UsageError(f"{where} must be a mapping of key: value")
    d = {str(k).replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown {noun}(s) {', '.join(unknown)}; {hint}")
    return d


def local_paths(value, folder: Path):
    """Paths relative to a YAML file's folder become absolute when they exist there, so runs can start anywhere."""
    if isinstance(value, list):
        return [local_paths(v, folder) for v in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
        return str((folder / value).resolve())
    return value


def load_yaml(path: str | Path) -> dict:
    """A config file's options as {field_name: value} (dashes in keys read as underscores)."""
    return config_file(path)[0]


def click_type(f: dataclasses.Field) -> click.ParamType:
    """The Click type of a field's flag: its choices, else int, float or text (booleans are flags)."""
    if f.metadata.get("choices"):
        return click.Choice(f.metadata["choices"])
    base = str(f.type).split("|")[0].strip()
    return {"int": click.INT, "float": click.FLOAT, "bool": click.BOOL}.get(base, click.STRING)


def value_of(f: dataclasses.Field, value):
    """A config-file value read as the flag would read it: the flag's Click type, choices and limits.

    A list for a repeatable option is its values; for a comma-separated text option it is joined with commas.
    Raises ValueError saying what is wrong."""
    if value is None:
        if f.default is None or isinstance(f.default, tuple):
            return f.default
        raise ValueError("needs a value (it is empty)")
    if isinstance(f.default, tuple):
        return tuple(_scalar(f, v) for v in (value if isinstance(value, list | tuple) else [value]))
    if isinstance(value, list | tuple) and click_type(f) is click.STRING:
        value = ",".join(str(_scalar(f, v)) for v in value)
    return _scalar(f, value)


def _scalar(f: dataclasses.Field, value):
    if isinstance(value, dict | list | tuple):
        raise ValueError(f"takes one value, not a {'mapping' if isinstance(value, dict) else 'list'}")
    kind = click_type(f)
    if isinstance(value, bool) and kind is not click.BOOL:
        choices = f.metadata.get("choices") or ()
        if "on" not in choices:  # YAML 1.1 reads yes/no/on/off as booleans
            raise ValueError(f"YAML read {value} as a boolean (from yes/no/on/off?); quote the value")
        value = "on" if value else "off"
    try:
        converted = kind.convert(value if isinstance(value, bool) else str(value), None, None)
    except click.BadParameter as err:
        raise ValueError(err.message.rstrip(".")) from None
    limits = f.metadata.get("limits")
    problem = limits.problem(converted) if limits is not None and not isinstance(f.default, tuple) else None
    if problem:
        raise ValueError(f"{converted} {problem}")
    return converted


def typed(
    cls, values: dict, source: str = "config", lines: dict[str, int] | None = None, command: str = "train"
) -> dict:
    """`values` (from a file or a dict) converted and checked like the command's flags; errors name `source`, the line
    (from `lines`, when known) and the key."""
    lines = lines or {}
    place = lambda key: f"{source} line {lines[key]}" if key in lines else source  # noqa: E731
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=lambda k: lines.get(k, 0))
    if unknown:
        raise UsageError(
            f"{place(unknown[0])}: unknown option(s) in config file: {', '.join(unknown)}; "
            f"see `fnscale {command} --help`"
        )
    out = {}
    for key, value in values.items():
        try:
            out[key] = value_of(fields[key], value)
        except ValueError as err:
            raise UsageError(f"{place(key)}: {key}: {err}") from None
    return out


def check_limits(cfg) -> None:
    """The bounds of every option of a resolved config (config-file values were checked where they were read)."""
    for f in dataclasses.fields(cfg):
        limits, value = f.metadata.get("limits"), getattr(cfg, f.name)
        problem = limits.problem(value) if limits is not None and isinstance(value, int | float) else None
        if problem:
            flag = (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]
            raise UsageError(f"{flag} {value} {problem}")


def merge(cls, yaml_values: dict, cli_values: dict, cli_explicit: set[str], command: str = "train"):
    """Defaults < YAML < flags given on the command line; YAML values are typed and checked like flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(yaml_values) - names)
    if unknown:
        raise UsageError(f"unknown option(s) in config file: {', '.join(unknown)}; see `fnscale {command} --help`")
    values = {k: v for k, v in cli_values.items() if k in names}
    for k, v in typed(cls, yaml_values, "config file", command=command).items():
        if k not in cli_explicit:
            values[k] = v
    return cls(**values)
