"""fnscale cl, pure parts: the matrix formulas on a planted case, the EWC penalty against a plain computation,
the growing protected set and its cap, the sequence file, the benchmark registry read offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fnscale.continual import benchmarks, ewc, metrics, protect, report, spec
from fnscale.errors import UsageError

# ---------------------------------------------------------------- the matrix


def test_summary_on_a_planted_matrix():
    R = [[80.0, 10.0, 5.0], [60.0, 90.0, 20.0], [50.0, 70.0, 85.0]]
    base, single = [10.0, 5.0, 0.0], [82.0, 88.0, 95.0]
    s = metrics.summary(R, base, single)
    assert s["AA"] == pytest.approx((50 + 70 + 85) / 3)
    assert s["BWT"] == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert s["FWT_base"] == pytest.approx(((10 - 5) + (20 - 0)) / 2)  # R[j-1][j] - b_j
    assert s["FWT_single"] == pytest.approx(((90 - 88) + (85 - 95)) / 2)  # R[j][j] - s_j
    assert s["forgetting"] == [80.0 - 50.0, 90.0 - 70.0, None]
    one = metrics.summary([[7.0]])
    assert one["AA"] == 7.0 and one["BWT"] is None and one["FWT_base"] is None
    assert (
        metrics.summary(R, base, [None, None, 1.0])["FWT_single"] is None
    )  # a missing reference: no figure, not a wrong one
    with pytest.raises(UsageError, match="square"):
        metrics.summary([[1.0, 2.0]])


def test_forgetting_takes_the_best_score_after_training():
    R = [[50.0, 0.0, 0.0], [70.0, 40.0, 0.0], [30.0, 45.0, 60.0]]  # task 0 improved at stage 1, then fell
    assert metrics.summary(R)["forgetting"][:2] == [70.0 - 30.0, 40.0 - 45.0]


def test_paired_interval_by_hand():
    a, b = {1: 11.0, 2: 11.5, 3: 12.0}, {1: 9.0, 2: 9.0, 3: 9.0, 4: 0.0}
    p = metrics.paired(a, b)
    half = 4.302652729911275 * 0.5 / np.sqrt(3)  # t(0.975, 2) * sd([2, 2.5, 3]) / sqrt(3)
    assert p["seeds"] == [1, 2, 3] and p["mean"] == pytest.approx(2.5)
    assert float(p["low"]) == pytest.approx(2.5 - half) and float(p["high"]) == pytest.approx(2.5 + half) and p["shown"]
    assert metrics.paired({1: 1.0, 2: -1.0}, {1: 0.0, 2: 0.0})["shown"] is False


def test_cells_and_label_accuracy():
    assert report.cell({"exact_match": 0.25, "loss": 1.5}, "exact_match") == 25.0
    assert report.cell({"exact_match": 0.25, "loss": 1.5}, "loss") == -1.5
    samples = [
        {"reference": "Sports", "generation": " sports."},
        {"reference": "World", "generation": "Worldwide"},
        {"reference": "Business", "generation": "Business\nmore"},
        {"reference": "true", "generation": "false"},
    ]
    assert report.label_accuracy(samples) == 0.5
    assert report.label_accuracy([]) is None


# ---------------------------------------------------------------- EWC


def _tiny_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).float()


def test_ewc_hooks_give_the_gradient_of_loss_plus_penalty(tiny_llama, tiny_tokenizer):
    """The hooked gradient equals autograd of loss + lambda/2 sum F (theta - theta*)^2 computed plainly; with accumulation A
    each micro-batch carries 1/A of the penalty gradient."""
    torch.manual_seed(0)
    hooked, plain = _tiny_model(tiny_llama), _tiny_model(tiny_llama)
    names = [n for n, _ in plain.named_parameters()]
    fisher = {n: torch.rand_like(p) for n, p in plain.named_parameters() if "mlp" in n or "embed" in n}
    theta = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in plain.named_parameters()}
    lam = 37.0
    ids = torch.tensor([[5, 9, 12, 7, 3, 11]])
    ewc.EWCHooks(hooked, fisher, theta, lam, accumulation=1)
    hooked(input_ids=ids, labels=ids).loss.backward()
    loss = plain(input_ids=ids, labels=ids).loss
    reference = sum(
        lam / 2 * (fisher[n] * (p - theta[n]) ** 2).sum() for n, p in plain.named_parameters() if n in fisher
    )
    (loss + reference).backward()
    assert ewc.penalty(plain, fisher, theta, lam).item() == pytest.approx(reference.item(), rel=1e-6)
    for (n, a), (_, b) in zip(hooked.named_parameters(), plain.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), n
    assert len(names) > len(fisher)  # parameters without a Fisher entry are left alone (and still matched above)

    halved = _tiny_model(tiny_llama)
    ewc.EWCHooks(halved, fisher, theta, lam, accumulation=2)
    (halved(input_ids=ids, labels=ids).loss / 2).backward()  # what Accelerate does to each of 2 micro-batches
    plain.zero_grad()
    reference = sum(
        lam / 2 * (fisher[n] * (p - theta[n]) ** 2).sum() for n, p in plain.named_parameters() if n in fisher
    )
    ((plain(input_ids=ids, labels=ids).loss + reference) / 2).backward()
    for (n, a), (_, b) in zip(halved.named_parameters(), plain.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), n


def test_fisher_is_the_mean_squared_per_example_gradient(tiny_llama, tiny_tokenizer, tmp_path):
    from fnscale import data

    model = _tiny_model(tiny_llama)
    items = [
        {"input_ids": [5, 9, 12, 7], "labels": [-100, -100, 12, 7]},
        {"input_ids": [3, 11, 4], "labels": [-100, 11, 4]},
    ]
    fisher = ewc.fisher_diagonal(model, items, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    name = "model.layers.0.mlp.down_proj.weight"
    expect = 0
    for it in items:
        model.zero_grad()
        model(**data.collate([it], tiny_tokenizer.pad_token_id)).loss.backward()
        expect = expect + dict(model.named_parameters())[name].grad ** 2 / len(items)
    assert torch.allclose(fisher[name], expect, rtol=1e-5, atol=1e-10) and fisher[name].abs().sum() > 0
    first = ewc.save_state(tmp_path / "f1.safetensors", fisher, tiny_llama, ["a"])
    summed = ewc.accumulate(fisher, first)
    assert torch.allclose(summed[name], 2 * fisher[name])
    loaded, theta = ewc.load_state(ewc.save_state(tmp_path / "f2.safetensors", summed, tiny_llama, ["a", "b"]))
    assert torch.equal(loaded[name], summed[name]) and torch.equal(
        theta[name], dict(model.named_parameters())[name].detach()
    )


# ---------------------------------------------------------------- protect-as-you-go


def test_protected_set_grows_caps_and_its_random_control_matches_sizes():
    width = 10
    found1 = {0: np.array([1, 2, 3]), 1: np.array([0])}
    p1, seen1 = protect.grow({}, {}, found1, width, max_share=0.5, seed=0)
    assert {k: v.tolist() for k, v in p1.items()} == {0: [1, 2, 3], 1: [0]} and {
        k: v.tolist() for k, v in seen1.items()
    } == {0: [1, 2, 3], 1: [0]}
    found2 = {0: np.array([2, 3, 4, 5, 6, 7]), 1: np.array([0, 9])}
    p2, seen2 = protect.grow(p1, seen1, found2, width, max_share=0.5, seed=0)
    assert set(p1[0]) <= set(p2[0]) and len(p2[0]) == 5 and set(p2[0]) <= {1, 2, 3, 4, 5, 6, 7}  # capped at 5 of 10
    assert p2[1].tolist() == [0, 9] and seen2[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    r1, rs1 = protect.grow({}, {}, found1, width, 0.5, seed=1, random_control=True)
    r2, _ = protect.grow(r1, rs1, found2, width, 0.5, seed=2, random_control=True)
    assert (
        [len(r1[k]) for k in (0, 1)] == [3, 1] and set(r1[0]) <= set(r2[0]) and set(r1[1]) <= set(r2[1])
    )  # same sizes, only grows
    assert len(r2[0]) == 5 and len(r2[1]) == len(p2[1]) == 2  # the networks add 4 (capped to 2) and 1 new neurons
    assert protect.share(p2, 2, width) == pytest.approx(7 / 20)


# ---------------------------------------------------------------- the sequence file and the benchmark registry


def _data(tmp_path, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    return path.name


def test_sequence_file_expands_jobs_and_refuses_mistakes(tmp_path):
    tasks = [
        {"name": n, "train": _data(tmp_path, n + "_tr"), "eval": _data(tmp_path, n + "_te"), "metric": "exact_match"}
        for n in "ab"
    ]
    cfg = {
        "train": {"max_steps": 2, "lora": False},
        "tasks": tasks,
        "orders": [["a", "b"], ["b", "a"]],
        "seeds": [1, 2],
        "arms": [
            {"name": "seq"},
            {"name": "lora", "lora": True},
            {"name": "replay", "replay": 0.2},
            {"name": "ewc", "ewc_lambda": 10},
        ],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seq = spec.load(path)
    seqs = [j for j in seq.jobs if j.kind == "sequence"]
    assert len(seqs) == 4 * 2 * 2 and seqs[1].job_id == "seq-seed1-order2" and seqs[1].order == ["b", "a"]
    singles = [j.job_id for j in seq.jobs if j.kind == "single"]
    assert (
        singles[:2] == ["single-seq-a-seed1", "single-seq-a-seed2"] and len(singles) == 2 * 2 * 2
    )  # families seq and lora
    assert seq.reference_of(seq.arms[2]) == "seq" and seq.reference_of(seq.arms[1]) == "lora"
    assert seq.tasks["a"].train == str(tmp_path / "a_tr.jsonl") and [j.index for j in seq.jobs] == list(
        range(len(seq.jobs))
    )
    for change, message in [
        ({"orders": [["a"]]}, "every order must list each task once"),
        ({"arms": [{"name": "x", "ewc_lambda": 1, "lora": True}]}, "EWC penalises full weights"),
        ({"arms": [{"name": "x", "mask_control": "random"}]}, "give the arm a `protect` block"),
        ({"arms": [{"name": "x", "dataset": "d.jsonl"}]}, "cannot be set here"),
        ({"arms": [{"name": "x", "protect": {"components": 2, "max_share": 2}}]}, "max_share"),
        ({"tasks": [dict(tasks[0], metric="bleu"), tasks[1]]}, "metric 'bleu'"),
        ({"arms": [{"name": "x", "lerning_rate": 1}]}, "unknown key"),
    ]:
        path.write_text(yaml.safe_dump({**cfg, **change}))
        with pytest.raises(UsageError, match=message):
            spec.load(path)


def test_benchmark_registry_reads_local_files_in_the_hub_format(tmp_path):
    assert [len(benchmarks.ORDERS[k]) for k in range(1, 7)] == [4, 4, 4, 15, 15, 15]
    assert all(sorted(benchmarks.ORDERS[k]) == sorted(benchmarks.ORDERS[4]) for k in (5, 6)) and set(
        benchmarks.ORDERS[4]
    ) == set(benchmarks.TASKS)
    raw = tmp_path / "raw"
    rows = {
        "ag_news": [{"text": f"news {i}", "label": i % 4} for i in range(8)],
        "dbpedia": [{"title": f"T{i}", "content": f"c {i}", "label": i % 14} for i in range(8)],
        "amazon": [{"text": f"review {i}", "label": i % 5} for i in range(8)] + [{"text": "x", "label": -1}],
        "yahoo": [
            {"question_title": "q", "question_content": "c", "best_answer": "a", "topic": i % 10} for i in range(8)
        ],
    }
    for name, rs in rows.items():
        for split in ("train", "test"):
            (raw / name).mkdir(parents=True, exist_ok=True)
            (raw / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    tasks, orders = benchmarks.materialise(
        {"name": "standard", "orders": [1, 3], "train_size": 5, "test_size": 3, "local": "raw"},
        tmp_path,
        tmp_path / "data",
    )
    assert orders == [benchmarks.ORDERS[1], benchmarks.ORDERS[3]] and [t["name"] for t in tasks] == benchmarks.ORDERS[1]
    ag = [json.loads(x) for x in open(tasks[3]["train"])]
    assert len(ag) == 5 and all(r["completion"] in ("World", "Sports", "Business", "Science") for r in ag)
    assert (
        ag[0]["prompt"].startswith("What is the topic of this news? news ")
        and "Choose one of: World, Sports" in ag[0]["prompt"]
    )
    amazon = [json.loads(x) for x in open(tasks[1]["eval"])]
    assert (
        len(amazon) == 3
        and all(r["completion"] in benchmarks.STARS for r in amazon)
        and tasks[1]["metric"] == "label_accuracy"
    )
    with pytest.raises(UsageError, match="has orders"):
        benchmarks.materialise({"name": "standard", "orders": [4]}, tmp_path, tmp_path / "data")
    with pytest.raises(UsageError, match="not found"):
        benchmarks.materialise({"name": "long", "orders": [4], "local": "raw"}, tmp_path, tmp_path / "d2")


def test_cli_lists_jobs_and_reports_a_bad_file_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    tasks = [{"name": n, "train": _data(tmp_path, n), "eval": _data(tmp_path, n)} for n in "ab"]
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"tasks": tasks, "seeds": [1, 2], "arms": [{"name": "seq"}, {"name": "rep", "replay": 0.5}]})
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "fnscale", "cl", str(path), "--list"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[:2] == [
        "0\tseq-seed1-order1\tsequence: a -> b",
        "1\tseq-seed2-order1\tsequence: a -> b",
    ]
    assert (
        p.stdout.splitlines()[-1] == "7\tsingle-seq-b-seed2\tsingle: b"
    )  # replay shares the sequential arm's references
    path.write_text(yaml.safe_dump({"tasks": tasks, "arms": [{"name": "x", "protect": {"component": 3}}]}))
    p = subprocess.run(
        [sys.executable, "-m", "fnscale", "cl", str(path), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: arms[0] (x).protect: unknown key(s) component")
