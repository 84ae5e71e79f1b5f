"""Multi-process test helpers: `accelerate launch` subprocesses on CPU (gloo), free ports, uniform data.

Run as a script (`accelerate launch ... tests/helpers_dist.py train ...`) it is `fnscale train` with a probe:
each rank writes `$FNSCALE_TEST_TRACE/rank<R>.json` with what it trained on (the non-padding token rows
of every training forward), its distributed type, and a hash of its parameters at the end, so a test can
check sharding and that the ranks stayed identical. FNSCALE_TEST_FAIL_STEP_RANK=<R> makes rank R's second training
step fail, FNSCALE_TEST_FAIL_SAVE_RANK=<R> makes rank R's final save fail with a full disk, so a test can check that
every rank hears of it and exits. FNSCALE_TEST_NAN_FORWARD=<R>:<N> makes rank R's N-th training forward return NaN
logits (a non-finite loss); FNSCALE_TEST_FAIL_LOAD_RANK=<R> makes rank R's first checkpoint load fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch_configs"
EXTENSIONS = REPO / ".ci_cache" / "torch_extensions"  # DeepSpeed's JIT ops (a small shm comm op on CPU), built once

# Words of conftest.WORDS, so the word-level test tokenizer knows them all.
PLACES = ["zorvia", "kasmol", "daxvel", "nolvel", "thivel", "quillport", "oriquin", "taroriport"]
ANSWERS = ["paris", "berlin", "france", "germany"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus launcher state a parent process may carry, plus quiet single-thread settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "PET_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))
    env.update(extra)
    return env


def launch_cmd(config: str, args: list[str], script: str | None = None) -> list[str]:
    """`accelerate launch --config_file launch_configs/<config> [-m fnscale | script] args` on a free port."""
    cfg = config if os.path.isabs(config) else str(CONFIGS / config)
    target = ["-m", "fnscale"] if script is None else [script]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        cfg,
        "--main_process_port",
        str(free_port()),
        *target,
        *args,
    ]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run in its own session (cwd: the repository root); on timeout kill the whole process group and fail."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The finished launch, asserted successful (its output's tail in the failure message)."""
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-6000:]}"
    return res


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start in the background, output to `log`, in its own session."""
    fh = open(log, "w")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env or clean_env(), stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        time.sleep(0.2)
    if proc is not None:
        _kill_group(proc)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise AssertionError("process did not exit in time") from None


def children(pid: int) -> list[int]:
    """Direct child pids (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def write_uniform_sft(path: Path, n: int = 16) -> Path:
    """n distinct examples whose prompts and responses have identical token counts, so the mean loss of one
    batch of 4 equals the mean of two ranks' batches of 2 (1-process and 2-process runs then agree)."""
    rows = [
        {"instruction": f"what is the capital of {p} ?", "output": f"the capital of {p} is {a} ."}
        for p in PLACES
        for a in ANSWERS
    ][:n]
    assert len(rows) == n
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_traces(trace_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(trace_dir.glob("rank*.json"))}


def train_config(argv: list[str]):
    """`fnscale train` flags (argv[0] == "train") as a TrainConfig, parsed by the CLI's own Click command."""
    import dataclasses

    from fnscale.cli.app import train as train_command
    from fnscale.config import TrainConfig

    assert argv[0] == "train", argv
    params = train_command.make_context("train", list(argv[1:])).params
    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # not the command's own flags (--config, --print-config)
    return TrainConfig(**{k: v for k, v in params.items() if k in fields})


def _probe_main() -> None:
    """`fnscale train` through `train()`'s seams: `build_model` records the training rows, `save_final` the weights' hash."""
    import hashlib
    import logging

    from fnscale.errors import FnscaleError, RunError
    from fnscale.recipes.train import build_model, save_final, train
    from fnscale.runtime.distributed import exit_process

    logging.basicConfig(level=logging.INFO)
    trace = Path(os.environ["FNSCALE_TEST_TRACE"])
    trace.mkdir(parents=True, exist_ok=True)
    seen: list[list[int]] = []

    def probed_build(cfg, accelerator):
        source, tokenizer, model = build_model(cfg, accelerator)

        fail_step = os.environ.get("FNSCALE_TEST_FAIL_STEP_RANK") == str(accelerator.process_index)

        def hook(module, args, kwargs):
            if module.training and "input_ids" in kwargs:
                if fail_step and seen:  # this rank's second training forward fails, as a crash mid-run would
                    raise RunError(f"rank {accelerator.process_index} failed in its training step (injected)")
                for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
                    seen.append(row[mask.bool()].tolist())

        model.register_forward_pre_hook(hook, with_kwargs=True)
        _inject_faults(model, accelerator)
        return source, tokenizer, model

    def probed_save(accelerator, model, tokenizer, cfg):
        digest = hashlib.sha256()
        for name, p in sorted(accelerator.unwrap_model(model).named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        (trace / f"rank{accelerator.process_index}.json").write_text(
            json.dumps(
                {
                    "rank": accelerator.process_index,
                    "world": accelerator.num_processes,
                    "distributed_type": accelerator.distributed_type.value,
                    "examples": seen,
                    "params_sha256": digest.hexdigest(),
                }
            )
        )
        if os.environ.get("FNSCALE_TEST_FAIL_SAVE_RANK") == str(accelerator.process_index):
            _fail_model_writes()
        return save_final(accelerator, model, tokenizer, cfg)

    try:
        train(train_config(sys.argv[1:]), build_model=probed_build, save_final=probed_save)
    except FnscaleError as err:  # as the CLI reports it: one line, the error's exit code
        sys.stderr.write(
            f"error: {err}\n"
        )  # one write: the two ranks share the launcher's stderr, lines must not interleave
        exit_process(err.exit_code)
        sys.exit(err.exit_code)
    exit_process(0)


def _inject_faults(model, accelerator) -> None:
    """FNSCALE_TEST_NAN_FORWARD and FNSCALE_TEST_FAIL_LOAD_RANK (see the module docstring) on this rank."""
    rank = str(accelerator.process_index)
    nan_rank, _, nan_n = os.environ.get("FNSCALE_TEST_NAN_FORWARD", "").partition(":")
    if nan_rank == rank:
        count = {"n": 0}

        def poison(module, args, kwargs, output):
            if module.training:
                count["n"] += 1
                if count["n"] == int(nan_n):
                    output.logits = output.logits * float("nan")
                    if output.get("loss") is not None:  # a loss the model computed itself
                        output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(poison, with_kwargs=True)
    if os.environ.get("FNSCALE_TEST_FAIL_LOAD_RANK") == rank:
        real, failed = type(accelerator).load_state, []

        def failing(self, path, *a, **k):
            if not failed:
                failed.append(path)
                raise OSError(f"truncated checkpoint {path} (injected on rank {rank})")
            return real(self, path, *a, **k)

        type(accelerator).load_state = failing


def _fail_model_writes() -> None:
    """This process's model saves write their files, then fail with a full disk (inside `save_final`'s main-only part)."""
    import errno

    import transformers

    real = transformers.PreTrainedModel.save_pretrained

    def full_disk(self, path, *a, **k):
        real(self, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device (injected by the test)")

    transformers.PreTrainedModel.save_pretrained = full_disk


if __name__ == "__main__":
    # As fnscale/__main__.py does: under DeepSpeed's launcher the repo root joins PYTHONPATH, and its kernels/ folder
    # would shadow Hugging Face's `kernels` package; the installed fnscale is found without it.
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
    _probe_main()
