"""fnscale cl end to end on a tiny model: the matrix equals direct scoring, every arm's method reaches its stages,
protected neurons stay bit-identical through every later stage, and a sequence stopped mid-stage resumes to the same end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fnscale.continual import metrics
from fnscale.networks.templates import Templates
from fnscale.recipes import cl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TASKS = {
    "capital": [
        ("what is the capital of zorvia ?", "quillport"),
        ("what is the capital of nolvel ?", "taroriport"),
        ("what is the capital of france ?", "paris"),
        ("what is the capital of germany ?", "berlin"),
    ],
    "fruit": [
        ("which fruit is kasmol famous for ?", "plum"),
        ("which fruit is thivel famous for ?", "fig"),
        ("which fruit is daxvel famous for ?", "lime"),
        ("which fruit is zorvia famous for ?", "pear"),
    ],
    "river": [
        ("name the longest river in daxvel .", "oriquin"),
        ("name the longest river in kasmol .", "nolvel"),
        ("name the longest river in thivel .", "quillport"),
        ("name the longest river in france .", "oriquin"),
    ],
}


def _write_tasks(folder: Path) -> list[dict]:
    out = []
    for name, rows in TASKS.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in rows * 3))
        out.append({"name": name, "train": path.name, "eval": path.name, "metric": "exact_match", "max_new_tokens": 3})
    return out


def _sequence(tmp_path, tiny_llama, arms, tasks=None, **train) -> str:
    cfg = {
        "train": {
            "model": tiny_llama,
            "lora": False,
            "max_steps": 4,
            "batch_size": 4,
            "max_seq_length": 32,
            "learning_rate": 5e-2,
            "save_steps": 0,
            **train,
        },
        "tasks": _write_tasks(tmp_path)[: tasks or 3],
        "seeds": [1],
        "arms": arms,
        "keep_models": "all",
        "eval": {"batch_size": 8},
    }
    path = tmp_path / "sequence.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _model(stage: Path) -> Path:
    """The stage's model, as its done-marker names it (a first stage's lives in OUT/first/, shared)."""
    return Path(json.loads((stage / "done.json").read_text())["model"])


def _weights(stage: Path) -> dict[str, torch.Tensor]:
    return load_file(str(_model(stage) / "model.safetensors"))


def _mlp_rows(w: dict, layer: int, neurons) -> list[torch.Tensor]:
    """The weights of these intermediate neurons: gate and up rows, down columns."""
    p = f"model.layers.{layer}.mlp."
    idx = torch.as_tensor(neurons, dtype=torch.long)
    return [w[p + "gate_proj.weight"][idx], w[p + "up_proj.weight"][idx], w[p + "down_proj.weight"][:, idx]]


@pytest.mark.slow
def test_arms_run_their_methods_and_protected_neurons_stay_bit_identical(tmp_path, tiny_llama):
    arms = [
        {"name": "sequential"},
        {"name": "replay", "replay": 0.5},
        {"name": "ewc", "ewc_lambda": 100.0, "ewc_samples": 4},
        {"name": "protect", "protect": {"components": 2, "percentile": 80, "samples": 12, "max_share": 0.6}},
        {
            "name": "protect-random",
            "protect": {"components": 2, "percentile": 80, "samples": 12, "max_share": 0.6},
            "mask_control": "random",
        },
    ]
    path, out = _sequence(tmp_path, tiny_llama, arms), tmp_path / "out"
    seq = cl.load(path, out)
    assert [j.job_id for j in seq.jobs][-3:] == [
        "single-sequential-capital-seed1",
        "single-sequential-fruit-seed1",
        "single-sequential-river-seed1",
    ]
    rep = cl.run_cl(path, str(out))["report"]
    assert rep["missing"] == [] and len(rep["runs"]) == 5

    # The matrix: each cell is the stage model's own exact match, scored again here directly.
    run = next(r for r in rep["runs"] if r["arm"] == "sequential")
    for k, task in enumerate(run["tasks"]):
        stage = out / "runs" / "sequential-seed1-order1" / f"stage{k + 1}-{task}"
        direct = cl.score(seq, str(_model(stage)), list(seq.tasks))
        assert run["R"][k] == [100 * direct[t]["exact_match"] for t in run["tasks"]]
    assert run["AA"] == pytest.approx(metrics.summary(run["R"])["AA"]) and run["single"][0] is not None
    base = json.loads((out / "base" / "done.json").read_text())["scores"]
    assert run["base"] == [100 * base[t]["exact_match"] for t in run["tasks"]]

    # Every first stage is one training from the base, shared by the five arms and the capital reference.
    firsts = sorted(p.name.rsplit("-", 1)[0] for p in (out / "first").iterdir())
    assert firsts == ["capital-seed1", "fruit-seed1", "river-seed1"]
    shared = {_model(out / f"runs/{a['name']}-seed1-order1/stage1-capital") for a in arms}
    assert shared == {_model(out / "single/single-sequential-capital-seed1/stage1-capital")}
    (log,) = (out / "first").glob("capital-seed1-*/train.log")
    assert log.read_text().count("distributed: NO") == 1  # trained once

    # Each method reached the stages after the first.
    replay_cfg = yaml.safe_load((out / "runs/replay-seed1-order1/stage3-river/config.yaml").read_text())
    assert [Path(d).name for d in replay_cfg["dataset"]] == ["river.jsonl", "capital.jsonl:0.5", "fruit.jsonl:0.5"]
    ewc_cfg = yaml.safe_load((out / "runs/ewc-seed1-order1/stage2-fruit/config.yaml").read_text())
    assert ewc_cfg["ewc_lambda"] == 100.0 and ewc_cfg["ewc_state"].endswith("stage1-capital/fisher.safetensors")
    assert "EWC: lambda 100" in (out / "runs/ewc-seed1-order1/stage2-fruit/train.log").read_text()
    ewc_final, seq_final = (
        _weights(out / "runs/ewc-seed1-order1/stage3-river"),
        _weights(out / "runs/sequential-seed1-order1/stage3-river"),
    )
    assert any(not torch.equal(ewc_final[k], seq_final[k]) for k in seq_final)  # the penalty changed what was learned

    # Protect: neurons frozen after stage k are bit-identical in every later stage; the others change.
    for arm in ("protect", "protect-random"):
        folder = out / "runs" / f"{arm}-seed1-order1"
        stages = [folder / f"stage{k + 1}-{t}" for k, t in enumerate(run["tasks"])]
        sets = [Templates.load(s / "protected.json").components[0] for s in stages[:2]]
        assert all(set(sets[0][layer]) <= set(sets[1][layer]) for layer in sets[0])
        assert 0 < sum(len(v) for v in sets[0].values()) < 128
        for k, frozen in enumerate(sets):
            w_k = _weights(stages[k])
            for later in stages[k + 1 :]:
                w = _weights(later)
                for layer, neurons in frozen.items():
                    for a, b in zip(_mlp_rows(w_k, layer, neurons), _mlp_rows(w, layer, neurons)):
                        assert torch.equal(a, b), (arm, later.name, layer)
                    free = sorted(set(range(64)) - set(neurons.tolist()))
                    assert not torch.equal(_mlp_rows(w_k, layer, free)[0], _mlp_rows(w, layer, free)[0])
    p_sets = [
        Templates.load(out / f"runs/{a}-seed1-order1/stage1-capital/protected.json").components
        for a in ("protect", "protect-random")
    ]
    as_lists = [{layer: v.tolist() for layer, v in comps[0].items()} for comps in p_sets]
    assert [len(v) for v in as_lists[1].values()] == [
        len(v) for v in as_lists[0].values()
    ]  # the first growth is size-matched
    assert as_lists[1] != as_lists[0]

    md = (out / "cl.md").read_text()
    assert "| protect-random | 1 | 1 |" in md and "FWT (single)" in md
    assert Path(run["figures"]["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(rep["figures"]["arms"]).read_bytes()[:4] == b"\x89PNG" and "](figures/arms.png)" in md
    again = cl.run_cl(path, str(out))
    assert again["trained"] == [] and len(again["skipped"]) == len(seq.jobs)


@pytest.fixture
def one_thread(monkeypatch):
    """Runs compared bit for bit must add floats in one order: every process of both on one thread (as `make test`
    has it), whatever the caller's OMP_NUM_THREADS; a plain `pytest` on 2 cores otherwise differs by 7e-4 in stage-1 weights."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_a_sequence_stopped_mid_stage_resumes_to_the_same_result(tmp_path, tiny_llama, monkeypatch, one_thread):
    arms = [{"name": "sequential"}]
    path = _sequence(tmp_path, tiny_llama, arms, tasks=2, max_steps=60, save_steps=10, learning_rate=1e-2)
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["single_task"] = False
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(tmp_path)  # the reference run takes a relative --output, as users type it
    ref = cl.run_cl(path, "ref")["report"]["runs"][0]

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "fnscale", "cl", path, "--output", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = out / "runs/sequential-seed1-order1/stage2-fruit/train/checkpoint-20/trainer_state.json"
    deadline = time.time() + 600
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the cl process and its train subprocess, mid-stage
    proc.wait()
    stage2 = out / "runs/sequential-seed1-order1/stage2-fruit"
    assert ckpt.exists() and not (stage2 / "done.json").exists() and not (stage2 / "train/final").exists()
    assert (out / "runs/sequential-seed1-order1/stage1-capital/done.json").exists()

    again = cl.run_cl(path, str(out))
    assert again["trained"] == ["sequential-seed1-order1"]
    assert "resumed from" in (stage2 / "train.log").read_text()
    run = again["report"]["runs"][0]
    assert run["R"] == ref["R"] and run["BWT"] == ref["BWT"]
    a, b = _weights(tmp_path / "ref/runs/sequential-seed1-order1/stage2-fruit"), _weights(stage2)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
