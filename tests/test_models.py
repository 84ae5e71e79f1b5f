"""Model resolution, dtypes, devices, LoRA targets, QLoRA on CPU, and the embedded GGUF default."""

import time

import pytest
import torch

from fnscale.errors import UsageError
from fnscale.models import loading


def test_device_and_dtype_resolution():
    assert loading.pick_device("cpu").type == "cpu"
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UsageError, match="--dtype"):
        loading.resolve_dtype("int3", torch.device("cpu"))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        loading.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        loading.resolve_model(str(tmp_path / "empty"))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UsageError, match="hub is unreachable"
    ):  # resolve_model refuses it at once (not cached, offline)
        loading.resolve_model("nobody/does-not-exist")
    with pytest.raises(UsageError, match="hub is unreachable"):  # a source made by hand: the load says the same
        loading.load_tokenizer(loading.ModelSource("nobody/does-not-exist", "nobody/does-not-exist"))


def test_lora_targets_auto_and_checked(tiny_llama, tiny_gpt2):
    llama = loading.load_model(loading.ModelSource(tiny_llama, "l"), torch.float32)
    assert loading.lora_targets(llama, None) == loading.LLAMA_LIKE_TARGETS
    with pytest.raises(UsageError, match=r"not found.*available: .*q_proj"):
        loading.lora_targets(llama, ["q_proj", "wq"])
    gpt2 = loading.load_model(loading.ModelSource(tiny_gpt2, "g"), torch.float32)
    assert loading.lora_targets(gpt2, None) == ["c_attn", "c_proj", "c_fc"]


def test_qlora_4bit_and_8bit_on_cpu(tiny_llama):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    src = loading.ModelSource(tiny_llama, "l")
    for four in (True, False):
        q = loading.quantization_config(four, not four, torch.device("cpu"), torch.float32)
        model = loading.load_model(src, torch.float32, q, device_map={"": "cpu"})
        cls = bnb.nn.Linear4bit if four else bnb.nn.Linear8bitLt
        assert any(isinstance(m, cls) for m in model.modules())
        model = loading.add_lora(model, 4, 8, 0.0, None, quantized=True)
        model.train()  # bitsandbytes' CPU inference path repacks weights and needs widths divisible by 32
        ids = torch.tensor([[2, 5, 6, 7, 3]])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
        assert grads and torch.isfinite(loss)


def test_qlora_refused_where_bitsandbytes_cannot_run():
    with pytest.raises(UsageError, match="does not support mps"):
        loading.quantization_config(True, False, torch.device("mps"), torch.float16)
    with pytest.raises(UsageError, match="one of"):
        loading.quantization_config(True, True, torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_embedded_gguf_default_loads_and_is_cached(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF converts once to a cached safetensors folder; the second resolve is instant."""
    monkeypatch.setenv("FNSCALE_CACHE", str(tmp_path))
    t0 = time.time()
    src = loading.resolve_model(None)
    first = time.time() - t0
    assert (tmp_path / "models").is_dir() and src.display_name == "SmolLM2-135M-Instruct"
    t0 = time.time()
    assert loading.resolve_model(None).path == src.path
    assert time.time() - t0 < 1.0 < first
    tok = loading.load_tokenizer(src)
    model = loading.load_model(src, torch.float32)
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0])
