"""fnscale eval: figures against direct computation, training lowers task loss, CL metrics, report files, CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnscale import data
from fnscale.errors import UsageError
from fnscale.eval import scoring
from fnscale.eval.scoring import RetentionProbe, cl_metrics
from fnscale.recipes import evaluate
from fnscale.recipes.evaluate import EvalConfig, run_eval

RETENTION = "the sun rises in the east and sets in the west .\n\nwater boils at one hundred degrees .\n\nparis is the capital of france . berlin is the capital of germany .\n"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def retention_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ret") / "general.txt"
    path.write_text(RETENTION)
    return str(path)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _items(tok, source):
    return data.build_sft_data(tok, source, 64, validation_split=0.0).train


def _fit(model, tok, source, steps=60, lr=1e-2):
    """A plain full-batch AdamW loop: enough for a tiny model to memorise four facts."""
    torch.manual_seed(0)
    batch = data.collate(_items(tok, source), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def finetuned(tiny_llama, sft_file, tmp_path_factory):
    model, tok = _load(tiny_llama)
    out = tmp_path_factory.mktemp("full")
    _fit(model, tok, sft_file).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def adapter(tiny_llama, sft_file, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    model, tok = _load(tiny_llama)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
            modules_to_save=["lm_head"],
            task_type="CAUSAL_LM",
        ),
    )  # a random frozen head caps the loss
    out = tmp_path_factory.mktemp("run") / "final"
    _fit(peft_model, tok, sft_file, steps=40, lr=1e-2).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def report(tiny_llama, adapter, finetuned, sft_file, retention_txt, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = EvalConfig(
        model=tiny_llama,
        adapter=(adapter,),
        finetuned=(finetuned,),
        task=sft_file,
        task_split="all",
        retention=(retention_txt,),
        generate=8,
        batch_size=3,
        max_seq_length=64,
        output=str(out),
    )
    return run_eval(cfg), out


# ---------------------------------------------------------------- direct computation


def direct_loss(model, items) -> float:
    """Per-example, unpadded: -log p(label) summed over labelled next tokens / their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            for pos, label in enumerate(it["labels"][1:]):
                if label != data.IGNORE:
                    total -= float(logp[pos, label])
                    count += 1
    return total / count


def direct_greedy(model, tok, items) -> tuple[float, float]:
    """One example at a time, argmax loop: (exact match, token accuracy)."""
    exact, matched, total = 0, 0, 0
    with torch.no_grad():
        for it in items:
            start = next(i for i, l in enumerate(it["labels"]) if l != data.IGNORE)
            ids, ref, gen = list(it["input_ids"][:start]), it["input_ids"][start:], []
            for _ in range(len(ref) + evaluate.GEN_SLACK):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                gen.append(nxt)
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
            matched += sum(g == r for g, r in zip(gen, ref))
            total += len(ref)
            exact += (
                tok.decode(gen, skip_special_tokens=True).split() == tok.decode(ref, skip_special_tokens=True).split()
            )
    return exact / len(items), matched / total


def _models(report):
    rep, _ = report
    return {m["kind"]: m for m in rep["models"]}


def test_task_and_retention_figures_match_direct_computation(report, tiny_llama, finetuned, adapter, sft_file):
    from peft import PeftModel

    by_kind = _models(report)
    base, tok = _load(tiny_llama)
    items = _items(tok, sft_file)
    paragraphs = [p for p in RETENTION.split("\n\n") if p.strip()]
    own = [tok(p.strip(), add_special_tokens=False).input_ids for p in paragraphs]  # the text's own tokens: no EOS
    ret_items = [{"input_ids": ids, "labels": ids} for ids in own]
    full, _ = _load(finetuned)
    lora = PeftModel.from_pretrained(_load(tiny_llama)[0], adapter).eval()
    for kind, model in (("base", base.eval()), ("finetuned", full.eval()), ("adapter", lora)):
        task = by_kind[kind]["task"]["task"]
        assert task["loss"] == pytest.approx(direct_loss(model, items), rel=1e-5)
        assert task["ppl"] == pytest.approx(math.exp(task["loss"]), rel=1e-9)
        assert task["tokens"] == sum(sum(l != data.IGNORE for l in it["labels"][1:]) for it in items)
        ret = by_kind[kind]["retention"]["general"]
        assert ret["loss"] == pytest.approx(direct_loss(model, ret_items), rel=1e-5)
        assert ret["tokens"] == sum(len(it["input_ids"]) - 1 for it in ret_items)


def test_generation_scores_match_direct_greedy_decoding(report, finetuned, sft_file):
    model, tok = _load(finetuned)
    items = _items(tok, sft_file)
    chosen = [items[i] for i in evaluate.pick(len(items), 8, 42)]
    em, acc = direct_greedy(model, tok, chosen)
    task = _models(report)["finetuned"]["task"]["task"]
    assert task["generated"] == 8
    assert task["exact_match"] == pytest.approx(em)
    assert task["token_accuracy"] == pytest.approx(acc)
    assert acc > 0.8  # the memorised facts come back: the metric sees learning, not only zeros


def test_training_lowers_task_loss_and_deltas_say_so(report):
    rep, _ = report
    base = _models(report)["base"]["task"]["task"]
    for kind in ("adapter", "finetuned"):
        m = _models(report)[kind]
        assert m["task"]["task"]["loss"] < base["loss"] - 1.0
        d = rep["deltas"][m["label"]]
        assert d["task"]["task"]["loss"] == pytest.approx(m["task"]["task"]["loss"] - base["loss"])
        assert d["summary"]["task_gain"] == pytest.approx(-d["task"]["task"]["loss"])
        assert d["task"]["task"]["token_accuracy"] > 0
        assert d["retention"]["general"]["loss"] == pytest.approx(
            m["retention"]["general"]["loss"] - _models(report)["base"]["retention"]["general"]["loss"]
        )


def test_adapter_is_unloaded_leaving_the_base_untouched(tiny_llama, adapter, sft_file):
    base, tok = _load(tiny_llama)
    items = _items(tok, sft_file)
    before = scoring.corpus_loss(base, items, 4, tok.pad_token_id, "cpu")["loss"]
    v = evaluate.Variant("a", "adapter", adapter)
    with evaluate.LoadedVariant(v, base, EvalConfig(), torch.float32, "cpu") as model:
        assert scoring.corpus_loss(model, items, 4, tok.pad_token_id, "cpu")["loss"] < before - 1.0
    assert type(base.lm_head).__name__ == "Linear" and not any("lora" in n for n, _ in base.named_modules())
    assert scoring.corpus_loss(base, items, 4, tok.pad_token_id, "cpu")["loss"] == before


def test_report_files_are_written(report, adapter):
    rep, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["deltas"]) == {m["label"] for m in rep["models"][1:]}
    assert on_disk["config"]["task_split"] == "all" and on_disk["config"]["generate"] == 8
    label = f"{Path(adapter).parent.name}/final"  # adapter dirs named `final` are labelled by their run
    assert label in on_disk["deltas"]
    md = (out / "report.md").read_text()
    assert "## What fine-tuning gained (task)" in md and "## What it cost (retention)" in md
    assert f"| {label} |" in md and "task_vs_retention.png" in md
    assert (out / "task_vs_retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["retention_metric"] == scoring.RETENTION_METRIC
    assert on_disk["retention"][0]["scored"] == scoring.SCORED_TEXT
    assert f"scored: {scoring.SCORED_TEXT}" in md and f"metric `{scoring.RETENTION_METRIC}`" in md
    runs = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert len(runs) == 3 and all(list((out / "tensorboard" / r).glob("events.out.tfevents.*")) for r in runs)
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------- continual learning


def test_cl_metrics_match_hand_computed_matrix():
    R = [[0.8, 0.1, 0.2], [0.6, 0.9, 0.3], [0.5, 0.7, 0.95]]
    b = [0.1, 0.2, 0.25]
    got = cl_metrics(R, b)
    assert got["ACC"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert got["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25: forgetting
    assert got["FWT"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.25)) / 2)  # -0.025
    one = cl_metrics([[0.4]], [0.1])
    assert one["ACC"] == 0.4 and one["BWT"] is None and one["FWT"] is None
    with pytest.raises(UsageError):
        cl_metrics([[1.0, 2.0]], [0.0])
    with pytest.raises(UsageError):
        cl_metrics([[1.0]], [0.0, 1.0])


def _cli(args):
    from click.testing import CliRunner

    from fnscale.cli import app as cli

    return CliRunner().invoke(cli.cli, args, catch_exceptions=False)


def test_sequence_mode_end_to_end_through_the_cli(tiny_llama, sft_file, retention_txt, tmp_path):
    rows = [json.loads(line) for line in Path(sft_file).read_text().splitlines()]
    task_a, task_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    task_a.write_text(
        "".join(json.dumps(r) + "\n" for r in rows if "zorvia" in r["instruction"] or "kasmol" in r["instruction"])
    )
    task_b.write_text(
        "".join(json.dumps(r) + "\n" for r in rows if "daxvel" in r["instruction"] or "nolvel" in r["instruction"])
    )
    model, tok = _load(tiny_llama)
    for name, task in (("ckpt_a", task_a), ("ckpt_b", task_b)):  # train on a, then continue on b
        _fit(model, tok, str(task), steps=40).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "seq.yaml").write_text("- {task: a.jsonl, checkpoint: ckpt_a}\n- {task: b.jsonl, checkpoint: ckpt_b}\n")
    out = tmp_path / "report"
    res = _cli(
        [
            "eval",
            "--model",
            tiny_llama,
            "--sequence",
            str(tmp_path / "seq.yaml"),
            "--task-split",
            "all",
            "--generate",
            "4",
            "--retention",
            retention_txt,
            "--max-seq-length",
            "64",
            "--output",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    assert "continual (token_accuracy): ACC" in res.output
    rep = json.loads((out / "report.json").read_text())
    c = rep["continual"]
    scores = {m["label"]: m["task"] for m in rep["models"]}
    assert c["tasks"] == ["a", "b"] and c["rows"] == ["ckpt_a", "ckpt_b"]
    assert c["R"] == [[scores[r][t]["token_accuracy"] for t in ("a", "b")] for r in ("ckpt_a", "ckpt_b")]
    assert c["baseline"] == [scores["base"][t]["token_accuracy"] for t in ("a", "b")]
    expect = cl_metrics(c["R"], c["baseline"])
    assert (c["ACC"], c["BWT"], c["FWT"]) == (expect["ACC"], expect["BWT"], expect["FWT"])
    assert c["R"][0][0] > c["baseline"][0] + 0.3 and c["R"][1][1] > c["baseline"][1] + 0.3  # each task was learned
    assert "Lopez-Paz & Ranzato (2017)" in (out / "report.md").read_text()


def test_cli_eval_with_adapter_and_help(tiny_llama, adapter, sft_file, tmp_path):
    res = _cli(
        [
            "eval",
            "--model",
            tiny_llama,
            "--adapter",
            adapter,
            "--task",
            sft_file,
            "--task-split",
            "all",
            "--generate",
            "2",
            "--retention",
            "none",
            "--max-seq-length",
            "64",
            "--output",
            str(tmp_path / "r"),
        ]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.md").is_file()
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    label = f"{Path(adapter).parent.name}/final"
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")]  # the summary table, on stdout
    assert table[0] == "| model | task loss | Δ | EM |"
    assert [r.split(" | ")[0] for r in table[1:]] == ["| base", f"| {label}"]
    assert f"{rep['models'][1]['task']['task']['loss']:.4f}" in table[2]
    assert (
        rep["retention"] == []
        and rep["deltas"][f"{Path(adapter).parent.name}/final"]["summary"]["retention_cost"] is None
    )
    help_text = " ".join(_cli(["eval", "--help"]).output.split())
    for flag in (
        "--model",
        "--adapter",
        "--finetuned",
        "--sequence",
        "--task",
        "--task-split",
        "--retention",
        "--generate",
        "--cl-metric",
        "--lm-eval-tasks",
        "--output",
        "[default: validation]",
        "[default: 32]",
    ):
        assert flag in help_text


# ---------------------------------------------------------------- user errors


def test_clear_errors(tiny_llama, finetuned, adapter, sft_file, tmp_path, monkeypatch):
    def cfg(**kw):
        return EvalConfig(
            **{"model": tiny_llama, "task": sft_file, "output": str(tmp_path / "o"), "max_seq_length": 64, **kw}
        )

    with pytest.raises(UsageError, match="not a PEFT adapter folder.*--finetuned"):
        run_eval(cfg(adapter=(finetuned,)))
    with pytest.raises(UsageError, match="--finetuned .* is a PEFT adapter folder"):
        run_eval(cfg(finetuned=(adapter,)))
    with pytest.raises(UsageError, match="not found"):
        run_eval(cfg(adapter=(str(tmp_path / "nope"),)))
    with pytest.raises(UsageError, match="no held-out examples"):
        run_eval(cfg(validation_split=0.0))
    with pytest.raises(UsageError, match="--sequence reads tasks"):
        run_eval(cfg(sequence=str(tmp_path / "s.yaml")))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="without `accelerate launch`"):
        run_eval(cfg())
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(evaluate, "lm_eval_available", lambda: False)
    with pytest.raises(UsageError, match=r"--lm-eval-tasks needs the lm-eval harness: run `pip install lm-eval`"):
        run_eval(cfg(lm_eval_tasks="hellaswag"))


def test_cli_error_is_one_line(tiny_llama, tmp_path, capsys):
    from fnscale.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(
            ["eval", "--model", tiny_llama, "--task", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data file {tmp_path / 'missing.jsonl'} not found; check the path"]


# ---------------------------------------------------------------- RetentionProbe (training integration)


def test_retention_reads_text_columns_and_sft_data_scoring_every_token(tiny_tokenizer, sft_file, tmp_path):
    tok = tiny_tokenizer
    text = " ".join(["the sun rises in the east"] * 5)  # 30 words -> 30 tokens (no BOS from this tokenizer, no EOS)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": text}) + "\n")
    windows = scoring.retention_items(tok, str(tmp_path / "t.jsonl"), max_len=8)
    assert [len(w["input_ids"]) for w in windows] == [8, 8, 8, 6]  # chunked, nothing dropped
    assert [t for w in windows for t in w["input_ids"]] == tok(text, add_special_tokens=False).input_ids
    sft = scoring.retention_items(tok, sft_file, max_len=512)
    task = _items(tok, sft_file)
    assert len(sft) == len(task) and all(w["labels"] == w["input_ids"] for w in sft)
    assert [w["input_ids"] for w in sft] == [t["input_ids"] for t in task]  # prompt + response, all scored


class _ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


def test_probe_shards_add_up_with_equal_forward_calls(tiny_llama, retention_txt):
    model, tok = _load(tiny_llama)
    items = scoring.retention_items(tok, retention_txt, max_len=5)  # 8 windows of <= 5 tokens
    bs = scoring.batches(items, 3, tok.pad_token_id)
    assert len(bs) == 3  # an odd count: rank 1 needs a padding forward
    whole = scoring.shard_sums(model, bs, 0, 1, "cpu")
    counter = _ForwardCounter(model)
    parts = [scoring.shard_sums(model, bs, r, 2, "cpu") for r in (0, 1)]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-6)
    assert sum(p[1] for p in parts) == whole[1]
    assert parts[0][2] == parts[1][2] == math.ceil(len(bs) / 2) and counter.calls == 2 * parts[0][2]


def test_probe_measure_keys_values_and_mode(tiny_llama, retention_txt):
    from accelerate import Accelerator

    model, tok = _load(tiny_llama)
    model.train()
    probe = RetentionProbe((retention_txt, "default"), tok, 64, 2)
    got = probe.measure(model, Accelerator(cpu=True), prefix="retention_before")
    assert set(got) == {
        "retention_before_loss/general",
        "retention_before_ppl/general",
        "retention_before_loss/retention",
        "retention_before_ppl/retention",
    }
    direct = scoring.corpus_loss(model, scoring.retention_items(tok, retention_txt, 64), 1, tok.pad_token_id, "cpu")
    assert got["retention_before_loss/general"] == pytest.approx(direct["loss"], rel=1e-6)
    assert got["retention_before_ppl/general"] == pytest.approx(math.exp(direct["loss"]), rel=1e-6)
    assert model.training  # restored


def test_train_logs_retention_before_and_after(tiny_llama, sft_file, retention_txt, tmp_path):
    from fnscale.config import TrainConfig
    from fnscale.recipes.train import train

    out = tmp_path / "run"
    summary = train(
        TrainConfig(
            model=tiny_llama,
            dataset=sft_file,
            output_dir=str(out),
            max_steps=2,
            batch_size=4,
            max_seq_length=64,
            eval_steps=0,
            save_steps=0,
            report_to="none",
            validation_split=0.0,
            eval_retention=(retention_txt,),
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if "retention_before_ppl/general" in r)
    model, tok = _load(tiny_llama)
    direct = scoring.corpus_loss(model, scoring.retention_items(tok, retention_txt, 64), 1, tok.pad_token_id, "cpu")
    assert before["retention_before_loss/general"] == pytest.approx(direct["loss"], rel=1e-5)  # LoRA starts as the base
    assert math.isfinite(summary["retention_after_ppl/general"])
    assert before["retention_scored"] == summary["retention_scored"] == {"general": scoring.SCORED_TEXT}
    assert summary["retention_metric"] == scoring.RETENTION_METRIC


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", ["cpu_2proc.yaml", "cpu_2proc_zero3.yaml"])
def test_probe_in_training_under_two_processes(launch_config, tiny_llama, sft_file, retention_txt, tmp_path):
    """DDP and ZeRO-3 over 2 gloo ranks: 3 retention batches (one rank pads) give the single-process figure, no hang."""
    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(repo / "launch_configs" / launch_config),
        "--main_process_port",
        str(port),
        "-m",
        "fnscale",
        "train",
        "--model",
        tiny_llama,
        "--dataset",
        sft_file,
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "1",
        "--max-seq-length",
        "64",
        "--eval-steps",
        "0",
        "--save-steps",
        "0",
        "--report-to",
        "none",
        "--validation-split",
        "0",
        "--eval-retention",
        retention_txt,
    ]
    res = subprocess.run(
        cmd, cwd=repo, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if "retention_before_loss/general" in r)
    model, tok = _load(tiny_llama)
    items = scoring.retention_items(tok, retention_txt, 64)
    assert len(items) == 3
    direct = scoring.corpus_loss(model, items, 1, tok.pad_token_id, "cpu")
    assert before["retention_before_loss/general"] == pytest.approx(direct["loss"], rel=1e-6)
    assert any("retention_after_loss/general" in r for r in records)
