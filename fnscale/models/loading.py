"""Model loading: HF ids, local folders, GGUF files, the embedded default, dtypes, devices, LoRA/QLoRA."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fnscale.config import PRECISIONS
from fnscale.errors import UsageError
from fnscale.models.paths import DEFAULT_MODEL, DEFAULT_NAME, check_hub_model, converted_folder, default_gguf_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LoRA targets per architecture family (model_type); anything else falls back to every Linear in attention/MLP.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA > MPS > CPU, unless a device is named."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp16 on MPS, fp32 on CPU."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise UsageError(f"unknown --dtype {name!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPlan:
    """How a run holds and computes its numbers.

    `name`: the resolved --precision; `autocast`: Accelerate's mixed_precision ("no", "bf16", "fp16": autocast,
    plus a GradScaler for fp16); `weights`: the dtype the model is loaded in; `compute`: the half dtype of
    autocast and of 4-bit compute (fp32 when none). Trainable weights stay fp32 under *-mixed (the optimizer
    updates fp32 master weights, as transformers' Trainer with bf16=True does); only bf16-true trains bf16 weights.
    """

    name: str
    autocast: str
    weights: torch.dtype
    compute: torch.dtype


def precision_plan(
    precision: str,
    dtype: str,
    device_type: str,
    bf16_supported: bool = True,
    lora: bool = False,
    quantized: bool = False,
    launch_mixed: str | None = None,
) -> PrecisionPlan:
    """--precision and --dtype resolved for a device: a pure function, so every combination can be tested on CPU.

    `auto` follows --dtype: bfloat16 -> bf16-mixed, float16 -> fp16-mixed, float32 -> fp32, auto -> bf16-mixed on
    CUDA (fp16-mixed where bf16 is unsupported; the launch config's mixed_precision when it names one), fp32 on
    other devices. LoRA loads the frozen base in the half dtype (adapters stay fp32, PEFT's default) to save memory.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}; use {', '.join(PRECISIONS)}")
    if dtype not in ("auto", *DTYPES):
        raise UsageError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    name = precision
    if name == "auto":
        if dtype != "auto":
            name = {"bfloat16": "bf16-mixed", "float16": "fp16-mixed", "float32": "fp32"}[dtype]
        elif launch_mixed in ("bf16", "fp16"):
            name = f"{launch_mixed}-mixed"
        elif device_type == "cuda":
            name = "bf16-mixed" if bf16_supported else "fp16-mixed"
        else:
            name = "fp32"
    if name == "fp16-mixed" and device_type == "cpu":
        raise UsageError(
            "fp16 training needs a GPU (Accelerate runs no fp16 autocast or GradScaler on the CPU); "
            "use --dtype bfloat16 or float32 on the CPU"
        )
    if name.startswith("bf16") and device_type == "cuda" and not bf16_supported:
        raise UsageError(f"--precision {name}: this GPU does not support bfloat16; use fp16-mixed")
    half = _HALF.get(name[:4], torch.float32)
    autocast = name[:4] if name.endswith("-mixed") else "no"
    weights = half if name == "bf16-true" or (autocast != "no" and (lora or quantized)) else torch.float32
    return PrecisionPlan(name, autocast, weights, half)


def convert_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Convert a GGUF file once into a cached safetensors folder, so later loads take seconds, not ~30 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_folder(gguf_path, name)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _check_gguf_architecture(gguf_path)
    log.info("converting %s to %s (once; ~30 s)", gguf_path.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, TypeError) as err:
        raise UsageError(f"cannot load GGUF file {gguf_path}: {str(err).splitlines()[0][:200]}") from err
    # The GGUF weights are de-quantised in memory; drop the quantizer so they save as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    from fnscale.runtime.atomic import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def _check_gguf_architecture(path: Path) -> None:
    """Refuse, in one line, a file that is not GGUF or whose architecture transformers cannot load."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, OSError, IndexError) as err:
        raise UsageError(f"{path} is not a readable GGUF file ({str(err).splitlines()[0][:120]})") from err
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise UsageError(
            f"GGUF file {path.name} has architecture {arch!r}, which transformers cannot load; supported: "
            f"{', '.join(supported)}"
        )


@dataclass
class ModelSource:
    """Where weights come from, resolved to something `from_pretrained` can read."""

    path: str
    display_name: str


def resolve_model(name_or_path: str | None, gguf_file: str | None = None) -> ModelSource:
    """Map --model/--gguf-file to a loadable folder or hub id; converts GGUF files to a cached folder."""
    if not name_or_path or name_or_path == DEFAULT_MODEL:
        if gguf_file:
            raise UsageError("--gguf-file needs --model (the folder or hub id that holds the file)")
        return ModelSource(str(convert_gguf(default_gguf_path(), DEFAULT_NAME)), DEFAULT_NAME)
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"GGUF file {name_or_path} not found; check the path")
        return ModelSource(str(convert_gguf(path)), path.stem)
    if gguf_file:
        gpath = path / gguf_file if path.is_dir() else None
        if gpath is None or not gpath.is_file():
            check_hub_model(name_or_path, gguf_file)  # uncached and offline: one line now, not minutes of retries
            gpath = _hub_file(name_or_path, gguf_file)
        return ModelSource(str(convert_gguf(Path(gpath))), Path(gguf_file).stem)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(
                f"--model {name_or_path} is not a model folder (no config.json); pass a folder saved with "
                "save_pretrained, a .gguf file or a hub id"
            )
        if not os.access(path / "config.json", os.R_OK):
            raise UsageError(f"--model {name_or_path} is not readable; check its permissions")
        return ModelSource(str(path), path.name)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UsageError(f"model folder {name_or_path} not found; check the path")
    check_hub_model(name_or_path)  # uncached and offline: one line now, not minutes of retries
    return ModelSource(name_or_path, name_or_path)


def _hub_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, token=hf_token())
    except Exception as err:  # offline, missing repo or file
        raise UsageError(
            f"cannot fetch {filename} from {repo_id}: {type(err).__name__} (offline or wrong name?); pass a local path "
            "instead"
        ) from err


def hf_token() -> str | None:
    """The HF token from HF_TOKEN / HUGGING_FACE_HUB_TOKEN, a .env file, or the login cache. Never log it."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        from dotenv import dotenv_values

        values = dotenv_values(Path.cwd() / ".env")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            if values.get(var):
                return values[var]
    except Exception:  # a malformed .env is not fatal here
        pass
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _hub_error(name: str, err: Exception) -> UsageError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UsageError(
        f"cannot load model {name!r}: it is not a local folder and the hub is unreachable or it does not exist "
        f"({msg[:160]}); pass a local folder or .gguf file"
    )


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, token=hf_token())
    except OSError as err:
        raise _hub_error(source.display_name, err) from err
    except ValueError as err:
        raise UsageError(
            f"cannot load the tokenizer of {source.display_name}: {str(err).splitlines()[0][:200]}"
        ) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, device: torch.device, compute_dtype: torch.dtype):
    """A BitsAndBytesConfig for QLoRA, or None. bitsandbytes runs on CUDA and (current releases) on CPU."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise UsageError("choose one of --load-in-4bit and --load-in-8bit")
    if device.type not in ("cuda", "cpu", "xpu"):
        raise UsageError(
            f"bitsandbytes does not support {device.type}; drop --load-in-4bit/--load-in-8bit or train on CUDA or CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load-in-4bit/--load-in-8bit need bitsandbytes; run `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # ZeRO-3 shards parameters by their storage dtype, so it must match the model dtype.
        bnb_4bit_quant_storage=compute_dtype,
    )


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    quant=None,
    trust_remote_code: bool = False,
    device_map=None,
    placement: dict | None = None,
):
    """`placement`: from_pretrained keywords of a model split over devices (fnscale.models.placement), or None."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, token=hf_token(), **(placement or {}))
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device_map is not None:
            kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as err:
        raise _hub_error(source.display_name, err) from err
    except ValueError as err:
        first = str(err).splitlines()[0][:240]
        if "trust_remote_code" in str(err):
            raise UsageError(
                f"{source.display_name} needs custom code; rerun with --trust-remote-code if you trust it"
            ) from err
        raise UsageError(f"cannot load model {source.display_name}: {first}") from err
    return model


def lora_targets(model, requested: list[str] | None) -> list[str]:
    """The requested targets, checked against the model, or the automatic ones for its architecture."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if requested:
        missing = [t for t in requested if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
            raise UsageError(
                f"LoRA target modules {missing} not found in {type(model).__name__}; available: {','.join(linear)}"
            )
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    candidates = LORA_TARGETS.get(model_type, LLAMA_LIKE_TARGETS)
    found = [t for t in candidates if t in names]
    if not found:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m) and "lm_head" not in n})
    return found


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def add_lora(
    model,
    r: int,
    alpha: int,
    dropout: float,
    targets: list[str] | None,
    quantized: bool,
    gradient_checkpointing: bool = False,
):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_targets(model, targets),
        task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )
    return get_peft_model(model, cfg)
