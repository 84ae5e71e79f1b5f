"""Bad input gets one line on stderr and a non-zero exit, never a traceback; nothing is lost."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fnscale.networks.templates import Templates

FNSCALE = [sys.executable, "-m", "fnscale"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama, sft_file):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": nope}\n')
    (d / "broken.json").write_text('[{"text": "ok"},\n {"text": ]')
    (d / "cols.csv").write_text("foo,bar\n1,2\n")
    (d / "corrupt.json").write_text("{not json")
    (d / "version.json").write_text(json.dumps({"format": "fnscale-templates", "version": 99}))
    (d / "not_a_dir").write_text("x")
    (d / "sched.yaml").write_text("max_steps: 1\nlr_scheduler: cosin\n")
    (d / "dtype.yaml").write_text("dtype: fp16\n")
    (d / "schema.yaml").write_text("# the data's columns\nschema: chatml\n")
    (d / "lr_text.yaml").write_text("learning_rate: fast\n")
    (d / "malformed.yaml").write_text("max_steps: 1\n  bad: [\n")
    Templates(layers=[0, 1, 2], neurons_per_layer=64, components={0: {0: [1]}}).save(d / "three_layers.json")
    Templates(layers=[0, 1], neurons_per_layer=64, components={0: {0: [1, 2]}, 1: {1: [3]}}).save(d / "ok.json")
    Templates(layers=[0, 1], neurons_per_layer=64, components={0: {0: list(range(64)), 1: list(range(64))}}).save(
        d / "all.json"
    )
    Templates(layers=[0, 1], neurons_per_layer=32, components={0: {0: [1]}}).save(d / "narrow.json")
    Templates(layers=[0], neurons_per_layer=64, components={0: {0: [1]}}, num_layers=2).save(d / "layer0.json")
    import gguf

    w = gguf.GGUFWriter(str(d / "odd.gguf"), "fnscalefake")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"dir": d, "model": tiny_llama, "data": sft_file}


def _train(f, *extra, data=None, model=None):
    return [
        "train",
        "--model",
        model or f["model"],
        "--dataset",
        data or f["data"],
        "--output-dir",
        str(f["dir"] / "out"),
        "--max-steps",
        "1",
        "--report-to",
        "none",
        "--validation-split",
        "0",
        *extra,
    ]


# (case id, argv builder, expected exit code, text the one-line message must contain)
CASES = [
    ("missing model", lambda f: _train(f, model=str(f["dir"] / "nope")), 2, "not found"),
    ("offline hub id", lambda f: _train(f, model="nobody/nothing-here"), 2, "hub is unreachable"),
    ("gguf arch", lambda f: _train(f, model=str(f["dir"] / "odd.gguf")), 2, "architecture 'fnscalefake'"),
    ("missing data", lambda f: _train(f, data=str(f["dir"] / "nope.jsonl")), 2, "not found"),
    ("empty data", lambda f: _train(f, data=str(f["dir"] / "empty.jsonl")), 2, "empty"),
    ("malformed jsonl", lambda f: _train(f, data=str(f["dir"] / "broken.jsonl")), 2, "line 3"),
    ("malformed json", lambda f: _train(f, data=str(f["dir"] / "broken.json")), 2, "line 2"),
    ("csv columns", lambda f: _train(f, data=str(f["dir"] / "cols.csv")), 2, "found ['bar', 'foo']"),
    ("seq too small", lambda f: _train(f, "--max-seq-length", "3"), 2, "too small"),
    (
        "template missing",
        lambda f: _train(
            f, "--mask-mode", "lesion", "--ica-template-path", str(f["dir"] / "no.json"), "--ica-component-ids", "0"
        ),
        2,
        "not found",
    ),
    (
        "template corrupt",
        lambda f: _train(
            f,
            "--mask-mode",
            "lesion",
            "--ica-template-path",
            str(f["dir"] / "corrupt.json"),
            "--ica-component-ids",
            "0",
        ),
        2,
        "not valid JSON",
    ),
    (
        "template version",
        lambda f: _train(
            f,
            "--mask-mode",
            "lesion",
            "--ica-template-path",
            str(f["dir"] / "version.json"),
            "--ica-component-ids",
            "0",
        ),
        2,
        "version 99",
    ),
    (
        "template other model",
        lambda f: _train(
            f,
            "--mask-mode",
            "lesion",
            "--ica-template-path",
            str(f["dir"] / "three_layers.json"),
            "--ica-component-ids",
            "0",
        ),
        2,
        "model has 2 layers",
    ),
    (
        "component out of range",
        lambda f: _train(
            f, "--mask-mode", "lesion", "--ica-template-path", str(f["dir"] / "ok.json"), "--ica-component-ids", "7"
        ),
        2,
        "7",
    ),
    (
        "bad percentile",
        lambda f: _train(f, "--mask-mode", "lesion", "--ica-component-ids", "0", "--ica-percentile", "100"),
        2,
        "between 0 and 100",
    ),
    (
        "mask removes all",
        lambda f: _train(
            f, "--mask-mode", "lesion", "--ica-template-path", str(f["dir"] / "all.json"), "--ica-component-ids", "0"
        ),
        2,
        "every MLP neuron",
    ),
    (
        "mask keeps all",
        lambda f: _train(
            f, "--mask-mode", "preserve", "--ica-template-path", str(f["dir"] / "all.json"), "--ica-component-ids", "0"
        ),
        2,
        "neuron",
    ),
    (
        "too many components",
        lambda f: _train(f, "--mask-mode", "lesion", "--ica-component-ids", "0", "--ica-components", "500"),
        2,
        "components",
    ),
    ("lora targets", lambda f: _train(f, "--lora-target-modules", "q_proj,wq"), 2, "wq"),
    (
        "triton without cuda",
        lambda f: _train(
            f,
            "--mask-mode",
            "lesion",
            "--ica-template-path",
            str(f["dir"] / "ok.json"),
            "--ica-component-ids",
            "0",
            "--mask-kernel",
            "triton",
        ),
        2,
        "CUDA",
    ),
    (
        "output not writable",
        lambda f: (
            _train(f)[:-8]
            + [
                "--output-dir",
                str(f["dir"] / "not_a_dir" / "run"),
                "--max-steps",
                "1",
                "--report-to",
                "none",
                "--validation-split",
                "0",
            ]
        ),
        2,
        "not writable",
    ),
    ("push without repo", lambda f: _train(f, "--push-to-hub"), 2, "--hub-repo-id"),
    (
        "templates bad percentile",
        lambda f: ["templates", "build", f["model"], f["data"], "--percentile", "0"],
        2,
        "between 0 and 100",
    ),
    ("templates show missing", lambda f: ["templates", "show", str(f["dir"] / "no.json")], 2, "not found"),
    ("unknown yaml option", lambda f: _train(f, "--config", str(f["dir"] / "c.yaml")), 2, "unknown option"),
    # checked before the model loads (issue 14): the options, the template file, then the model's config.json
    (
        "mask without ids",
        lambda f: _train(f, "--mask-mode", "lesion", "--ica-template-path", str(f["dir"] / "ok.json")),
        2,
        "--ica-component-ids",
    ),
    (
        "layers outside template",
        lambda f: _train(
            f,
            "--mask-mode",
            "lesion",
            "--ica-template-path",
            str(f["dir"] / "layer0.json"),
            "--ica-component-ids",
            "0",
            "--ica-layers",
            "0-1",
        ),
        2,
        "does not cover",
    ),
    (
        "template width",
        lambda f: _train(
            f, "--mask-mode", "lesion", "--ica-template-path", str(f["dir"] / "narrow.json"), "--ica-component-ids", "0"
        ),
        2,
        "model has 2 layers × 64 neurons",
    ),
    ("ddp timeout too short", lambda f: _train(f, "--ddp-timeout", "1"), 2, "--ddp-timeout"),
    (
        "templates ddp timeout too short",
        lambda f: ["templates", "build", f["model"], f["data"], "--ddp-timeout", "5"],
        2,
        "--ddp-timeout 5",
    ),
    # config files are read like flags, errors name the file, the line and the key (issue 20)
    (
        "yaml choice lr_scheduler",
        lambda f: _train(f, "--config", str(f["dir"] / "sched.yaml")),
        2,
        "sched.yaml line 2: lr_scheduler: 'cosin' is not one of",
    ),
    (
        "yaml choice dtype",
        lambda f: _train(f, "--config", str(f["dir"] / "dtype.yaml")),
        2,
        "dtype.yaml line 1: dtype: 'fp16' is not one of",
    ),
    (
        "yaml choice schema",
        lambda f: _train(f, "--config", str(f["dir"] / "schema.yaml")),
        2,
        "schema.yaml line 2: schema: 'chatml' is not one of",
    ),
    (
        "yaml not a number",
        lambda f: _train(f, "--config", str(f["dir"] / "lr_text.yaml")),
        2,
        "lr_text.yaml line 1: learning_rate: 'fast' is not a valid float",
    ),
    (
        "yaml malformed",
        lambda f: _train(f, "--config", str(f["dir"] / "malformed.yaml")),
        2,
        "malformed.yaml line 2: malformed YAML",
    ),
    # tracebacks before (issue 20), one line now
    (
        "negative learning rate",
        lambda f: _train(f, "--learning-rate", "-1"),
        2,
        "--learning-rate -1.0 must be greater than 0",
    ),
    (
        "output dir is a file",
        lambda f: _train(f)[:-8] + ["--output-dir", str(f["dir"] / "not_a_dir"), "--max-steps", "1"],
        2,
        "not_a_dir is a file; pick a folder",
    ),
    (
        "random control under a file",
        lambda f: [
            "templates",
            "random",
            "--like",
            str(f["dir"] / "ok.json"),
            "--output",
            str(f["dir"] / "not_a_dir" / "r.json"),
        ],
        2,
        "not_a_dir is a file, not a folder",
    ),
    (
        "templates zero components",
        lambda f: ["templates", "build", f["model"], f["data"], "--components", "0"],
        2,
        "--components 0 must be at least 1",
    ),
    (
        "templates output is a file",
        lambda f: ["templates", "build", f["model"], f["data"], "--output", str(f["dir"] / "not_a_dir")],
        2,
        "is a file; pick a folder",
    ),
    (
        "offline hub id templates",
        lambda f: ["templates", "build", "nobody/nothing-here", f["data"]],
        2,
        "hub is unreachable",
    ),
    (
        "offline hub id eval",
        lambda f: ["eval", "--model", "nobody/nothing-here", "--output", str(f["dir"] / "ev")],
        2,
        "hub is unreachable",
    ),
]


def _check(code, out, err, expect_code, expect_text):
    assert code == expect_code, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert expect_text in lines[0], lines[0]
    assert "Traceback" not in err + out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(files, case, capsys):
    from fnscale.cli.app import main

    (files["dir"] / "c.yaml").write_text("no_such_option: 1\n")
    _, argv, code, text = case
    with pytest.raises(SystemExit) as exc:
        main(argv(files))
    captured = capsys.readouterr()
    _check(exc.value.code, captured.out, captured.err, code, text)


@pytest.mark.parametrize("case", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_bad_input_click_runner(files, case):
    from fnscale.cli.app import cli

    _, argv, code, text = case
    res = CliRunner().invoke(cli, argv(files))
    _check(res.exit_code, res.stdout, res.stderr, code, text)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c[0] in ("missing data", "malformed jsonl", "template other model", "gguf arch", "csv columns")
    ],
    ids=lambda c: c[0],
)
def test_bad_input_subprocess(files, case):
    _, argv, code, text = case
    res = subprocess.run(FNSCALE + argv(files), capture_output=True, text=True, env=ENV, timeout=300)
    _check(res.returncode, res.stdout, res.stderr, code, text)


@pytest.mark.parametrize(
    "argv",
    [lambda f: _train(f, data=str(f["dir"] / "nope.jsonl")), lambda f: _train(f, "--learning-rate", "-1")],
    ids=["missing data", "negative learning rate"],
)
def test_debug_shows_the_traceback_and_keeps_the_exit_code(files, argv):
    res = subprocess.run(FNSCALE + ["--debug"] + argv(files), capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and "Traceback" in res.stderr, res.stderr


# Each is refused before torch is imported, in well under 3 s of CPU time (wall time on a shared machine varies).
EARLY = [
    "templates zero components",
    "offline hub id",
    "offline hub id templates",
    "offline hub id eval",
    "output dir is a file",
    "yaml choice dtype",
    "random control under a file",
]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in EARLY], ids=lambda c: c[0])
def test_refused_before_anything_loads(files, case):
    import resource

    _, argv, code, text = case
    probe = "import sys\nfrom fnscale.cli.app import main\ntry:\n    main(sys.argv[1:])\nfinally:\n    print('torch imported:', 'torch' in sys.modules)\n"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(
        [sys.executable, "-c", probe, *argv(files)], capture_output=True, text=True, env=ENV, timeout=120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    _check(res.returncode, res.stdout, res.stderr, code, text)
    assert "torch imported: False" in res.stdout
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 3.0


def test_unreachable_hub_is_refused_at_once(monkeypatch):
    """Without HF_HUB_OFFLINE: a closed port answers at once, a silent network within the probe's timeout."""
    import socket
    import time

    import huggingface_hub

    from fnscale.errors import UsageError
    from fnscale.models import paths

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match=r"hub is unreachable \(127.0.0.1: Connection refused\)"):
        paths.check_hub_model("nobody/nothing-here")

    def silent_network(*args, **kwargs):  # no answer, then the timeout a real connect would raise
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent_network)
    start = time.monotonic()
    with pytest.raises(UsageError, match="no answer from 127.0.0.1 within 0.3 s"):
        paths.check_hub_model("nobody/nothing-here", timeout_s=0.3)
    assert time.monotonic() - start < 2
    paths.check_hub_model("tiny/../folder")  # not a hub name: left to the model load


def test_missing_deepspeed_config_is_refused(monkeypatch):
    from fnscale.errors import UsageError
    from fnscale.runtime.distributed import check_launch_env

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "/nowhere/ds.json")
    with pytest.raises(UsageError, match="DeepSpeed config"):
        check_launch_env()


def test_disk_full_while_saving_leaves_nothing_half_written(files, tmp_path, monkeypatch, capsys):
    """ENOSPC during the final save: exit 1, one line, no partial `final` folder, the checkpoint intact."""
    import errno

    import transformers

    real = transformers.PreTrainedModel.save_pretrained

    def full_disk(self, path, *a, **k):
        real(self, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    from fnscale.cli.app import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--model",
                files["model"],
                "--dataset",
                files["data"],
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--no-lora",
                "--save-steps",
                "1",
                "--report-to",
                "none",
                "--validation-split",
                "0",
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "No space left" in err and "Traceback" not in err
    assert not (out / "final").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".final")]
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()


def test_token_never_printed_or_logged(files, tmp_path):
    token = "hf_fnscaleSECRETtoken0123456789"
    env = {**ENV, "HF_TOKEN": token}
    out = tmp_path / "run"
    runs = [
        subprocess.run(FNSCALE + ["doctor"], capture_output=True, text=True, env=env, timeout=300),
        subprocess.run(
            FNSCALE + _train(files)[:-8] + ["--output-dir", str(out), "--max-steps", "2", "--validation-split", "0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        ),
    ]
    assert "hf token    found" in runs[0].stdout
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert token not in r.stdout + r.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


def test_template_checked_against_a_converted_gguf_before_torch_loads(files, tmp_path, monkeypatch):
    """A .gguf --model already converted into the cache: the template is checked against the cached config.json
    before torch is imported (the file itself is not a loadable model, so reaching the load would fail otherwise)."""
    from fnscale.models.paths import converted_folder

    cache = tmp_path / "cache"
    env = {**ENV, "FNSCALE_CACHE": str(cache)}
    monkeypatch.setenv("FNSCALE_CACHE", str(cache))
    folder = converted_folder(files["dir"] / "odd.gguf")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "intermediate_size": 64, "hidden_size": 32})
    )
    argv = _train(
        files,
        "--mask-mode",
        "lesion",
        "--ica-template-path",
        str(files["dir"] / "narrow.json"),
        "--ica-component-ids",
        "0",
        model=str(files["dir"] / "odd.gguf"),
    )
    probe = "import sys\nfrom fnscale.cli.app import main\ntry:\n    main(sys.argv[1:])\nfinally:\n    print('torch imported:', 'torch' in sys.modules)\n"
    res = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env, timeout=120)
    _check(res.returncode, res.stdout, res.stderr, 2, "model has 2 layers × 64 neurons")
    assert "torch imported: False" in res.stdout
