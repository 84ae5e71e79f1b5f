"""Models that fit no single device, and multi-node for real (issue 15).

Fast: `--max-memory` parsing and refusals; `--device-map auto` with a CPU cap small enough that layers go
to disk gives the same templates and the same eval figures as the plain load. Slow (subprocesses on CPU,
gloo): ZeRO-3 templates build equals the 1-process build; a ZeRO-3 train run computes its templates and keeps
the masked neurons untouched; two launches as two machine ranks (one of them through the SLURM scripts)
equal one 2-process node.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import textwrap

import pytest
import torch
from helpers_dist import REPO, clean_env, finish, free_port, launch_cmd, ok, run, start, wait_for, write_uniform_sft
from safetensors.torch import load_file

from fnscale.config import EvalConfig, TemplatesBuildConfig
from fnscale.errors import UsageError
from fnscale.models.placement import parse_max_memory, placement
from fnscale.networks.templates import Templates
from fnscale.recipes.build_networks import run_build
from fnscale.recipes.evaluate import run_eval

CAP = "60KB"  # the tiny Llama is ~92 KB in fp32: the embedding stays on the CPU, the decoder layers go to disk


def same_neurons(a: Templates, b: Templates) -> None:
    assert sorted(a.components) == sorted(b.components)
    for c in a.components:
        assert {k: list(v) for k, v in a.components[c].items()} == {k: list(v) for k, v in b.components[c].items()}, c


# ---------------------------------------------------------------- --max-memory and --device-map (fast)


def test_max_memory_syntax(tmp_path):
    assert parse_max_memory("0=20GiB, cuda:1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory(None) is None
    (tmp_path / "m.yaml").write_text("0: 20GiB\ncpu: 64GiB\n")
    (tmp_path / "m.json").write_text(json.dumps({"0": "1GB", "disk": 1000}))
    assert parse_max_memory(str(tmp_path / "m.yaml")) == {0: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory(str(tmp_path / "m.json")) == {0: "1GB", "disk": 1000}
    for bad, says in (
        ("0:20GiB", "DEVICE=SIZE"),
        ("gpu=1GB", "unknown device"),
        ("cpu=lots", "bad size"),
        (str(tmp_path / "no.json"), "not found"),
    ):
        with pytest.raises(UsageError, match=says):
            parse_max_memory(bad)


def test_device_map_refusals(monkeypatch):
    with pytest.raises(UsageError, match="apply with --device-map auto"):
        placement(None, "cpu=1GB", None)
    with pytest.raises(UsageError, match="unknown --device-map"):
        placement("balanced", None, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="without `accelerate launch`"):
        placement("auto", None, None)
    assert "\n" not in str(pytest.raises(UsageError, placement, "auto", None, None).value)


def test_device_map_offload_templates_equal_plain_build(tiny_llama, sft_file, tmp_path, caplog):
    common = dict(
        model=tiny_llama,
        dataset=(sft_file,),
        samples_per_dataset=16,
        components=3,
        percentile=90.0,
        max_seq_length=48,
        batch_size=3,
        dtype="float32",
    )
    plain = run_build(TemplatesBuildConfig(output=str(tmp_path / "plain"), **common))["templates"]
    with caplog.at_level(logging.INFO, logger="fnscale"):
        split = run_build(
            TemplatesBuildConfig(
                output=str(tmp_path / "split"),
                device_map="auto",
                max_memory=f"cpu={CAP}",
                offload_folder=str(tmp_path / "offload"),
                **common,
            )
        )["templates"]
    placed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("device map:"))
    assert "cpu:" in placed and "disk:" in placed, placed  # really split: some modules offloaded to disk
    same_neurons(plain, split)


def test_device_map_offload_eval_equals_plain_eval(tiny_llama, sft_file, tmp_path, caplog):
    retention = tmp_path / "ret.txt"
    retention.write_text("the capital of france is paris . the sun rises in the east and sets in the west .\n" * 4)
    common = dict(
        model=tiny_llama,
        task=sft_file,
        task_split="all",
        retention=(str(retention),),
        generate=4,
        batch_size=3,
        max_seq_length=48,
        dtype="float32",
        device="cpu",
    )
    plain = run_eval(EvalConfig(output=str(tmp_path / "plain"), **common))
    with caplog.at_level(logging.INFO, logger="fnscale"):
        split = run_eval(
            EvalConfig(
                output=str(tmp_path / "split"),
                device_map="auto",
                max_memory=f"cpu={CAP}",
                offload_folder=str(tmp_path / "offload"),
                **common,
            )
        )
    assert any("disk:" in r.getMessage() for r in caplog.records)
    a, b = plain["models"][0], split["models"][0]
    for group in ("task", "retention"):
        for name, scores in a[group].items():
            for key in ("loss", "exact_match", "token_accuracy"):
                if scores.get(key) is not None:
                    assert b[group][name][key] == pytest.approx(scores[key], rel=1e-5, abs=1e-7), (group, name, key)
    assert a["task"]["task"]["loss"] > 0


# ---------------------------------------------------------------- ZeRO-3 (slow)


BUILD = [
    "templates",
    "build",
    "--dataset",
    "{data}",
    "--samples-per-dataset",
    "16",
    "--components",
    "3",
    "--percentile",
    "90",
    "--max-seq-length",
    "64",
    "--batch-size",
    "2",
    "--dtype",
    "float32",
    "--seed",
    "0",
]


def build_flags(model: str, data, out) -> list[str]:
    return [a.format(data=data) for a in BUILD] + ["--model", model, "--output", str(out)]


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return write_uniform_sft(tmp_path_factory.mktemp("scale_data") / "uniform.jsonl", 16)


@pytest.fixture(scope="module")
def one_process_templates(tiny_llama, data16, tmp_path_factory):
    out = tmp_path_factory.mktemp("tpl_one")
    ok(run([sys.executable, "-m", "fnscale", *build_flags(tiny_llama, data16, out)]))
    return Templates.load(out / "global_templates.json")


@pytest.mark.slow
def test_zero3_templates_build_equals_one_process(tiny_llama, data16, one_process_templates, tmp_path):
    res = ok(run(launch_cmd("cpu_2proc_zero3.yaml", build_flags(tiny_llama, data16, tmp_path))))
    assert "DEEPSPEED ZeRO-3, 2 process(es)" in res.stdout
    held = [line for line in res.stdout.splitlines() if "ZeRO-3 forward: rank 0 holds" in line]
    assert held, res.stdout[-3000:]
    n_held, n_total = (int(x) for x in held[0].split("holds ")[1].split(" parameter")[0].split(" of "))
    assert 0 < n_held < n_total  # loaded partitioned: rank 0 holds about half the elements
    same_neurons(one_process_templates, Templates.load(tmp_path / "global_templates.json"))


TRAIN = [
    "--template",
    "plain",
    "--max-seq-length",
    "64",
    "--validation-split",
    "0",
    "--max-steps",
    "2",
    "--eval-steps",
    "0",
    "--save-steps",
    "0",
    "--seed",
    "7",
    "--learning-rate",
    "1e-2",
    "--warmup-ratio",
    "0.5",
    "--max-grad-norm",
    "0.05",
    "--weight-decay",
    "0.1",
    "--report-to",
    "none",
    "--batch-size",
    "2",
]


def train_flags(model: str, data, out, *extra: str) -> list[str]:
    return ["train", "--model", model, "--dataset", str(data), "--output-dir", str(out), *TRAIN, *extra]


MASKING = [
    "--mask-mode",
    "lesion",
    "--ica-components",
    "3",
    "--ica-component-ids",
    "0",
    "--ica-samples",
    "8",
    "--ica-percentile",
    "90",
]


def masked_neurons(out) -> dict[int, torch.Tensor]:
    """Component 0 of the templates the run computed and saved, as sorted index tensors per layer."""
    neurons = Templates.load(out / "templates" / "global_templates.json").component_neurons([0])
    assert sum(len(v) for v in neurons.values()) > 0, "nothing masked: the checks would be vacuous"
    return {layer: torch.as_tensor(sorted(int(i) for i in chosen)) for layer, chosen in neurons.items()}


def assert_masked_untouched(base_file: str, after_file, neurons: dict[int, torch.Tensor]) -> None:
    """The masked slices (gate/up rows, down columns) equal the base's; something outside them trained."""
    base, after = load_file(base_file), load_file(after_file)
    changed_kept = False
    for layer, masked in neurons.items():
        kept = torch.as_tensor(sorted(set(range(64)) - set(masked.tolist())))
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            key = f"model.layers.{layer}.mlp.{name}.weight"
            assert torch.equal(base[key].index_select(dim, masked), after[key].index_select(dim, masked)), key
            changed_kept |= not torch.equal(base[key].index_select(dim, kept), after[key].index_select(dim, kept))
    assert changed_kept, "nothing trained: the check would be vacuous"


@pytest.mark.slow
def test_zero3_train_computes_templates_and_keeps_masked_neurons_untouched(tiny_llama, data16, tmp_path):
    """Full fine-tuning and LoRA under ZeRO-3 each compute their templates in the run, from partitioned forwards.

    LoRA: the adapter is added after the weights are partitioned and must stay unpartitioned until `prepare`,
    so the guard can zero its masked slices; the merged model keeps the masked base slices bit for bit.
    """
    full, lora = tmp_path / "full", tmp_path / "lora"
    ok(run(launch_cmd("cpu_2proc_zero3.yaml", train_flags(tiny_llama, data16, full, "--no-lora", *MASKING))))
    neurons = masked_neurons(full)
    assert_masked_untouched(f"{tiny_llama}/model.safetensors", full / "final" / "model.safetensors", neurons)

    res = ok(
        run(
            launch_cmd(
                "cpu_2proc_zero3.yaml",
                train_flags(tiny_llama, data16, lora, "--merge-adapter", "--lora-dropout", "0", *MASKING),
            )
        )
    )
    assert "ZeRO-3 forward: rank 0 holds" in res.stdout and "DEEPSPEED ZeRO-3, 2 process(es)" in res.stdout
    # The adapter starts as a no-op (lora_B = 0): the LoRA run finds the same networks as the full fine-tuning run.
    same_neurons(
        Templates.load(full / "templates" / "global_templates.json"),
        Templates.load(lora / "templates" / "global_templates.json"),
    )
    assert_masked_untouched(f"{tiny_llama}/model.safetensors", lora / "merged" / "model.safetensors", neurons)
    adapter = load_file(lora / "final" / "adapter_model.safetensors")
    for layer, masked in neurons.items():
        for name, part, dim in (("gate_proj", "lora_B", 0), ("up_proj", "lora_B", 0), ("down_proj", "lora_A", 1)):
            key = f"base_model.model.model.layers.{layer}.mlp.{name}.{part}.weight"
            assert torch.count_nonzero(adapter[key].index_select(dim, masked)) == 0, key
    assert any("lora_B" in k and torch.count_nonzero(t) > 0 for k, t in adapter.items()), "the adapter did not train"


# ---------------------------------------------------------------- two machine ranks on this machine (slow)


def two_nodes(args: list[str], tmp_path, tag: str) -> None:
    """Two `accelerate launch`es as machine ranks 0 and 1 of 2 (1 process each, static rendezvous on the loopback)."""
    port = free_port()
    procs = [
        start(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(REPO / "launch_configs" / "cpu_2proc.yaml"),
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "-m",
                "fnscale",
                *args,
            ],
            tmp_path / f"{tag}{rank}.log",
        )
        for rank in (0, 1)
    ]
    codes = [finish(p, 400) for p in procs]
    assert codes == [0, 0], "\n".join((tmp_path / f"{tag}{r}.log").read_text()[-3000:] for r in (0, 1))


@pytest.mark.slow
def test_two_machine_ranks_train_equals_one_two_process_node(tiny_llama, data16, tmp_path):
    ok(run(launch_cmd("cpu_2proc.yaml", train_flags(tiny_llama, data16, tmp_path / "node", "--no-lora"))))
    two_nodes(train_flags(tiny_llama, data16, tmp_path / "nodes", "--no-lora"), tmp_path, "train")
    one, two = (
        load_file(tmp_path / "node" / "final" / "model.safetensors"),
        load_file(tmp_path / "nodes" / "final" / "model.safetensors"),
    )
    assert sorted(one) == sorted(two)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-7)
    assert not torch.equal(
        one["model.layers.0.mlp.down_proj.weight"],
        load_file(f"{tiny_llama}/model.safetensors")["model.layers.0.mlp.down_proj.weight"],
    )


def _port_bound(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


SRUN = """#!/usr/bin/env bash
# srun stand-in for one node of the test's fake allocation: drop srun's options, run the task (SLURM_NODEID, SLURM_PROCID come from the test).
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\\nlocalhost\\n'
"""


@pytest.mark.slow
def test_two_machine_ranks_templates_through_the_slurm_scripts(tiny_llama, data16, one_process_templates, tmp_path):
    """slurm/templates_multinode.sbatch on each of two fake nodes: its own head-node lookup, port and c10d rendezvous."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bindir / name).write_text(textwrap.dedent(body))
        (bindir / name).chmod((bindir / name).stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "tpl"
    job = {
        "PATH": f"{bindir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(free_port()),
        "SLURM_JOB_NAME": "tpl",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NODELIST": "127.0.0.1,localhost",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "GPUS_PER_NODE": "1",
        "MAIN_PORT": str(free_port()),
        "CONFIG": "launch_configs/cpu_2proc.yaml",
    }

    def node(n: int):
        env = clean_env(**job, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0")
        return start(
            ["bash", "slurm/templates_multinode.sbatch", *build_flags(tiny_llama, data16, out)[2:]],
            tmp_path / f"node{n}.log",
            env=env,
        )

    # Both fake nodes share this machine's loopback: the launcher of node 0 refuses a rendezvous port that is already bound,
    # and node 1's c10d store would bind it (it also "is" the head host here). On a real cluster node 1 runs elsewhere. So
    # node 0 goes first, and node 1 starts once node 0's torchrun has bound the rendezvous store on that port.
    first = node(0)
    wait_for(lambda: _port_bound(int(job["MAIN_PORT"])), 300, first, "node 0's rendezvous store")
    procs = [first, node(1)]
    codes = [finish(p, 400) for p in procs]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:  # each node's launcher found the head node and port itself
        assert "2 node(s) x 1 process(es)" in log and f"rendezvous 127.0.0.1:{job['MAIN_PORT']}" in log
    # c10d hands out ranks in arrival order: one node (either) holds rank 0, which logs the group and saves once.
    joined = "".join(logs)
    assert joined.count("2 process(es), backend gloo") == 1 and joined.count("saved ") == 1
    same_neurons(one_process_templates, Templates.load(out / "global_templates.json"))
