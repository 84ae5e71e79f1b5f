"""Upload to the Hugging Face hub: explicit repo id, shows what is sent, token never printed."""

from __future__ import annotations

from pathlib import Path

from fnscale.errors import RunError, UsageError
from fnscale.models.loading import hf_token


def push_folder(folder: Path, repo_id: str | None, private: bool = False, api=None) -> str:
    if not repo_id:
        raise UsageError("--push-to-hub needs --hub-repo-id (e.g. me/my-model)")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    print(f"uploading {len(files)} files from {folder} to {repo_id} ({'private' if private else 'public'}):")
    for f in files:
        print(f"  {f}")
    token = hf_token()
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload with fnscale"
        )
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if token:
            msg = msg.replace(token, "***")
        raise RunError(f"upload to {repo_id} failed: {msg[:200]}; the files stay in {folder}") from err
    return f"https://huggingface.co/{repo_id}"
