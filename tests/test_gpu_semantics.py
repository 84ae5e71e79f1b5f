"""GPU semantics the CPU can check: the capture device, fp16 GradScaler skips, the token-normalised step loss, the
precision plan, host syncs per step, DeepSpeed and resume agreement over 2 ranks. Each was checked to fail on ae41823
(the same tests with its API: fnscale.train, Trainer.micro_step, the model-computed loss)."""

from __future__ import annotations

import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fnscale import data
from fnscale.config import TrainConfig
from fnscale.data import packing
from fnscale.errors import UsageError
from fnscale.models.loading import precision_plan
from fnscale.recipes import train as train_mod


def cfg(model, data_file, out, **kw):
    base = dict(
        model=model,
        dataset=data_file,
        output_dir=str(out),
        max_seq_length=64,
        validation_split=0.0,
        max_steps=2,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        lora=False,
        seed=0,
        warmup_ratio=0.0,
        lr_scheduler="constant",
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def fresh_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------- 1. networks computed in the run: capture device


def test_networks_are_captured_on_the_run_device(tiny_llama, sft_file, tmp_path, monkeypatch):
    """On a GPU, capture batches go to accelerator.device: the model must be there too. `meta` stands in for the GPU."""
    seen = {}

    class Captured(Exception):
        pass

    def fake_build(model, samples, *, accelerator, **kw):
        seen["model"], seen["run"] = next(model.parameters()).device, accelerator.device
        raise Captured

    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(train_mod, "build_templates", fake_build)
    with pytest.raises(Captured):
        train_mod.train(
            cfg(tiny_llama, sft_file, tmp_path, mask_mode="lesion", ica_components=2, ica_component_ids="0")
        )
    assert seen["model"] == seen["run"] == torch.device("meta")


# ---------------------------------------------------------------- the loop on hand-made windows


class _Bar:
    def update(self, n):
        pass


def _trainer(model, gas: int, max_grad_norm: float = 0.0, optimizer=None, scaler=None, mixed: str = "no"):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=gas, mixed_precision=mixed)
    if scaler is not None:  # Accelerate makes a GradScaler on GPUs only; the CPU one takes the same path here
        acc.scaler, acc.native_amp = scaler, True
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    prepared = train_mod.Prepared(acc, model, optimizer, scheduler, None, None, None, total_steps=100)
    config = TrainConfig(gradient_accumulation_steps=gas, max_grad_norm=max_grad_norm, logging_steps=1000)
    return train_mod.Trainer(config, prepared, None)


def _items(tokenizer, n=8):
    """n examples of different lengths, labels on the response only (as training builds them)."""
    items = []
    for i in range(n):
        prompt = tokenizer("what is the capital of zorvia ?" + " paris" * i)["input_ids"]
        answer = tokenizer(" the capital is" + " berlin" * (2 * i % 5))["input_ids"]
        items.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return items


def _micro_batches(items, size, pack, pad_id):
    groups = [items[i : i + size] for i in range(0, len(items), size)]
    if pack:
        return [packing.collate_packed(packing.pack_rows(g, 10**6), pad_id) for g in groups]
    return [data.collate(g, pad_id) for g in groups]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_step_loss_and_gradients_do_not_depend_on_the_micro_batching(tiny_llama, tiny_tokenizer, pack, fresh_state):
    """8 examples as 1x8, 2x4, 4x2 (and 8x1): the step's loss is sum NLL / trained tokens, gradients alike (1e-6)."""
    items = _items(tiny_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    results = []
    for gas in (1, 2, 4, 8):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        trainer = _trainer(model, gas)
        sums, applied = trainer.optimizer_step(_micro_batches(items, 8 // gas, pack, tiny_tokenizer.pad_token_id))
        assert applied
        loss = float(sums.nll / sums.tokens)
        delta = {
            n: (p.detach() - q.detach()) for (n, p), (_, q) in zip(base.named_parameters(), model.named_parameters())
        }
        results.append((loss, delta))
    # the plain reference: one forward over all 8, mean over every labelled target
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    whole = data.collate(items, tiny_tokenizer.pad_token_id)
    ref_loss = float(ref(**whole).loss.detach())
    for loss, delta in results:
        assert abs(loss - ref_loss) < 1e-6, (loss, ref_loss)
        for name, d in delta.items():
            torch.testing.assert_close(d, results[0][1][name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- 2. fp16: GradScaler skips an overflowing step


def test_fp16_overflow_step_is_skipped_by_the_scaler_and_training_goes_on(tiny_llama, tiny_tokenizer, fresh_state):
    """An inf gradient after clipping has unscaled: the scaler skips the step, lowers its scale; the next one steps."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = _trainer(
        model,
        1,
        max_grad_norm=1.0,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        scaler=scaler,
        mixed="fp16",
    )
    batch = [data.collate(_items(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)]
    weight = model.lm_head.weight
    before = weight.detach().clone()
    hook = weight.register_hook(lambda g: g * float("inf"))  # an fp16 overflow in backward
    _, applied = trainer.optimizer_step(batch)
    hook.remove()
    assert not applied and torch.equal(weight.detach(), before)
    assert scaler.get_scale() == 2.0**9  # update() ran: the scale backed off
    _, applied = trainer.optimizer_step(batch)  # ae41823: "unscale_() has already been called on this optimizer"
    assert applied and not torch.equal(weight.detach(), before)


# ---------------------------------------------------------------- 8. host syncs


def test_one_host_sync_per_optimizer_step_none_per_micro_batch(tiny_llama, tiny_tokenizer, fresh_state, monkeypatch):
    """Four micro-batches per step: fnscale's loop reads a tensor on the host once per step, for the skip decision
    (ae41823: at least two reads per micro-batch). Reads inside the model's own code are not counted."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    trainer = _trainer(model, 4, max_grad_norm=1.0)
    window = _micro_batches(_items(tiny_tokenizer), 2, False, tiny_tokenizer.pad_token_id)
    reads = {"n": 0}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            reads["n"] += "fnscale" in sys._getframe(1).f_code.co_filename
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(3):
        trainer.optimizer_step(window)
    assert reads["n"] == 3, reads


def test_log_window_reads_the_host_once_per_logged_step(tiny_llama, sft_file, tmp_path, monkeypatch):
    """A run logging every 4 steps reduces its window 1 time in 4 (ae41823: at every step, with per-batch floats)."""
    calls = {"totals": 0}
    real = train_mod.LogWindow.totals

    def counted(self, acc):
        calls["totals"] += 1
        return real(self, acc)

    monkeypatch.setattr(train_mod.LogWindow, "totals", counted)
    train_mod.train(cfg(tiny_llama, sft_file, tmp_path, max_steps=8, logging_steps=4, batch_size=2))
    assert calls["totals"] == 2


# ---------------------------------------------------------------- 5. precision


@pytest.mark.parametrize(
    "precision,dtype,device,bf16,lora,expect",
    [
        ("auto", "auto", "cuda", True, False, ("bf16-mixed", "bf16", torch.float32)),
        ("auto", "auto", "cuda", False, False, ("fp16-mixed", "fp16", torch.float32)),
        ("auto", "auto", "cpu", True, False, ("fp32", "no", torch.float32)),
        ("auto", "float16", "cuda", True, False, ("fp16-mixed", "fp16", torch.float32)),
        ("auto", "bfloat16", "cpu", True, False, ("bf16-mixed", "bf16", torch.float32)),
        ("auto", "auto", "cuda", True, True, ("bf16-mixed", "bf16", torch.bfloat16)),  # LoRA: frozen base in bf16
        ("bf16-true", "auto", "cuda", True, False, ("bf16-true", "no", torch.bfloat16)),
        ("fp32", "bfloat16", "cuda", True, False, ("fp32", "no", torch.float32)),
    ],
)
def test_precision_plan(precision, dtype, device, bf16, lora, expect):
    plan = precision_plan(precision, dtype, device, bf16, lora=lora)
    assert (plan.name, plan.autocast, plan.weights) == expect


def test_precision_plan_refusals_and_launch_config():
    with pytest.raises(UsageError, match="fp16 training needs a GPU"):
        precision_plan("auto", "float16", "cpu")
    with pytest.raises(UsageError, match="does not support bfloat16"):
        precision_plan("bf16-true", "auto", "cuda", bf16_supported=False)
    assert precision_plan("auto", "auto", "cuda", True, launch_mixed="fp16").name == "fp16-mixed"


def test_bf16_mixed_keeps_fp32_master_weights_so_small_updates_survive(tiny_llama, sft_file, tmp_path):
    """lr 2e-5: AdamW's first step moves each weight by ~2e-5, below half a bf16 ulp for |w| > 0.04 (2^-11 relative).
    Under bf16-mixed the trainable weights are fp32, run under bf16 autocast, and keep the update."""
    seen = {}

    def build(c, accelerator):
        seen["mixed"] = accelerator.mixed_precision
        return train_mod.build_model(c, accelerator)

    train_mod.train(
        cfg(
            tiny_llama,
            sft_file,
            tmp_path,
            precision="bf16-mixed",
            learning_rate=2e-5,
            max_steps=1,
            weight_decay=0.0,
            max_grad_norm=0.0,
        ),
        build_model=build,
    )
    assert seen["mixed"] == "bf16"
    base, after = load_file(f"{tiny_llama}/model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    w, w2 = base["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    assert w2.dtype == torch.float32
    big = w.abs() > 0.04
    assert big.sum() > 50
    moved = (w2 != w)[big].float().mean()
    assert moved > 0.95, moved
    lost_in_bf16 = (w[big].bfloat16() == (w[big] + 2e-5 * torch.sign(w[big])).bfloat16()).float().mean()
    assert lost_in_bf16 > 0.9, lost_in_bf16  # what bf16 weights would have kept of the same update


# ---------------------------------------------------------------- several processes (slow)


def _dist_args(model, data_file, out, *extra):
    return [
        "train",
        "--model",
        model,
        "--dataset",
        str(data_file),
        "--output-dir",
        str(out),
        "--template",
        "plain",
        "--max-seq-length",
        "64",
        "--validation-split",
        "0",
        "--eval-steps",
        "0",
        "--seed",
        "7",
        "--learning-rate",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--max-grad-norm",
        "0.05",
        "--report-to",
        "none",
        "--no-lora",
        *extra,
    ]


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from helpers_dist import write_uniform_sft

    return write_uniform_sft(tmp_path_factory.mktemp("gpu_sem_data") / "uniform.jsonl", 16)


@pytest.mark.slow
def test_deepspeed_nonfinite_loss_at_an_accumulation_boundary_skips_the_whole_step(tiny_llama, data16, tmp_path):
    """ZeRO-2, 2 ranks x batch 2, 2 micro-batches per step; rank 1's loss is NaN on its 2nd micro-batch (a boundary).
    DeepSpeed steps inside backward, so backward must run: the engine skips the step and clears the gradients.
    The weights equal one process (batch 4) whose 2nd micro-batch is NaN: the step skipped whole there too."""
    from helpers_dist import REPO, clean_env, launch_cmd, ok, read_traces, run
    from safetensors.torch import load_file

    extra = ("--gradient-accumulation-steps", "2", "--max-steps", "3", "--save-steps", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    probe = str(REPO / "tests" / "helpers_dist.py")
    ok(
        run(
            [sys.executable, probe, *_dist_args(tiny_llama, data16, one, "--batch-size", "4", *extra)],
            env=clean_env(FNSCALE_TEST_TRACE=str(tmp_path / "t1"), FNSCALE_TEST_NAN_FORWARD="0:2"),
        )
    )
    res = ok(
        run(
            launch_cmd(
                "cpu_2proc_zero2.yaml", _dist_args(tiny_llama, data16, two, "--batch-size", "2", *extra), script=probe
            ),
            env=clean_env(FNSCALE_TEST_TRACE=str(tmp_path / "t2"), FNSCALE_TEST_NAN_FORWARD="1:2"),
            timeout=600,
        )
    )
    assert "DEEPSPEED ZeRO-2" in res.stdout
    assert "non-finite loss or gradient at step 1" in res.stdout + res.stderr
    traces = read_traces(tmp_path / "t2")
    assert traces[0]["params_sha256"] == traces[1]["params_sha256"]
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_resume_auto_ranks_fall_back_together_when_one_cannot_load(tiny_llama, data16, tmp_path):
    """DDP, 2 ranks: checkpoints at steps 2 and 4; on resume rank 1 cannot load checkpoint-4. Both ranks fall back to
    checkpoint-2 (ae41823: rank 0 resumed at 4, rank 1 at 2, and the ranks then ran different step counts)."""
    from helpers_dist import REPO, clean_env, launch_cmd, ok, read_traces, run
    from safetensors.torch import load_file

    out = tmp_path / "run"
    probe = str(REPO / "tests" / "helpers_dist.py")
    args = _dist_args(
        tiny_llama, data16, out, "--batch-size", "2", "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "2"
    )
    ok(run(launch_cmd("cpu_2proc.yaml", args, script=probe), env=clean_env(FNSCALE_TEST_TRACE=str(tmp_path / "t1"))))
    first = load_file(out / "final" / "model.safetensors")
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    res = ok(
        run(
            launch_cmd("cpu_2proc.yaml", [*args, "--resume-from-checkpoint", "auto"], script=probe),
            timeout=300,
            env=clean_env(FNSCALE_TEST_TRACE=str(tmp_path / "t2"), FNSCALE_TEST_FAIL_LOAD_RANK="1"),
        )
    )
    log = res.stdout + res.stderr
    assert "cannot load checkpoint" in log and "rank 1" in log
    assert "checkpoint-2 at step 2" in log
    traces = read_traces(tmp_path / "t2")
    assert traces[0]["params_sha256"] == traces[1]["params_sha256"]
    again = load_file(out / "final" / "model.safetensors")
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.slow
def test_two_ranks_with_accumulation_equal_one_process_on_uneven_examples(tiny_llama, tmp_path):
    """Examples of 1 to 16 answer words: 2 ranks x batch 1 x 2 accumulation steps and 1 process x batch 4 see the same
    4 examples per step; the step loss (sum NLL / trained tokens) and the weights agree (ae41823 averaged means)."""
    import json

    from helpers_dist import ANSWERS, PLACES, clean_env, launch_cmd, ok, run
    from safetensors.torch import load_file

    from fnscale.runtime.metrics import read_metrics

    rows = [
        {"instruction": f"what is the capital of {PLACES[i % 8]} ?", "output": " ".join([ANSWERS[i % 4]] * (1 + i))}
        for i in range(16)
    ]
    data_file = tmp_path / "uneven.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ("--max-steps", "3", "--save-steps", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run([sys.executable, "-m", "fnscale", *_dist_args(tiny_llama, data_file, one, "--batch-size", "4", *common)]))
    ok(
        run(
            launch_cmd(
                "cpu_2proc.yaml",
                _dist_args(
                    tiny_llama, data_file, two, "--batch-size", "1", "--gradient-accumulation-steps", "2", *common
                ),
            ),
            env=clean_env(),
        )
    )
    loss = [[r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] for out in (one, two)]
    assert abs(loss[0][0] - loss[1][0]) < 1e-6, loss  # step 1: the same weights, the same 4 examples
    assert all(abs(x - y) < 1e-5 for x, y in zip(*loss)), loss
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for k in (
        a
    ):  # atol 1e-5: AdamW divides by sqrt(v) + eps, so reduction-order rounding in tiny gradients shows up to ~4e-6
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_lora_under_bf16_mixed_keeps_adapters_fp32_on_a_bf16_base(tiny_llama, sft_file, tmp_path):
    """LoRA with --dtype bfloat16: the frozen base loads in bf16 (memory), trained adapters stay fp32 under autocast."""
    seen = {}

    def build(c, accelerator):
        source, tok, model = train_mod.build_model(c, accelerator)
        seen["mixed"] = accelerator.mixed_precision
        seen["dtypes"] = {(p.requires_grad, p.dtype) for p in model.parameters()}
        return source, tok, model

    train_mod.train(cfg(tiny_llama, sft_file, tmp_path, lora=True, dtype="bfloat16", max_steps=1), build_model=build)
    assert seen["mixed"] == "bf16"
    assert seen["dtypes"] == {(False, torch.bfloat16), (True, torch.float32)}
