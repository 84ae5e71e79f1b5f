"""The bundled forgetting benchmark: its WordNet parser on hand-made lines, and the shipped files' shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from fnscale import data
from fnscale.recipes import sweep

BENCH = Path(__file__).resolve().parent.parent / "examples" / "forgetting"


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", BENCH / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wordnet_lines_are_parsed(tmp_path):
    md = _make_data()
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you | licence header\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist\n"
        '02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"\n'
    )
    (tmp_path / "index.noun").write_text("  1 licence\ndog n 2 5 @ ~ #m #p %p 2 1 02084071 10114209\n")
    synsets = md.read_synsets(tmp_path / "data.noun")
    assert synsets["02084071"] == (["dog", "domestic_dog"], "a member of the genus Canis", ["the dog barked all night"])
    assert synsets["00001740"] == (["entity"], "that which is perceived to exist", [])
    assert md.first_senses(tmp_path / "index.noun") == {"dog": "02084071"}


def test_shipped_files_are_a_held_out_short_answer_task_and_plain_text():
    train = data.load_records(str(BENCH / "task_train.jsonl"))
    val = data.load_records(str(BENCH / "task_val.jsonl"))
    assert (len(train), len(val)) == (600, 64)
    assert data.detect_schema(train[0].keys()) == "prompt-completion"
    assert all(len(r["completion"].split()) == 1 for r in train + val)
    assert all(
        r["completion"] not in r["prompt"].split("means: ", 1)[1] for r in train + val
    )  # the gloss does not give it away
    assert not {r["completion"] for r in train} & {r["completion"] for r in val}  # held-out words
    retention = (BENCH / "retention.txt").read_text()
    assert len(retention.split("\n\n")) == 30
    total = sum(f.stat().st_size for f in BENCH.iterdir() if f.is_file())
    assert total < 300_000


def test_benchmark_sweep_file_loads():
    s = sweep.load(BENCH / "sweep.yaml")
    configs = dict(s.configs)
    assert list(configs) == [
        "full-ft",
        "full-ft-lr3e-5",
        "lora",
        "lesion-update",
        "lesion-update-random",
        "lesion-forward",
        "preserve-update",
        "preserve-update-random",
    ] and s.seeds == [1, 2, 3]
    for name in list(configs)[
        3:
    ]:  # masked runs: the networks built from retention.txt (a relative path when not built yet)
        assert configs[name]["ica_template_path"].endswith("networks/global_templates.json")
        assert configs[name]["ica_component_ids"] == "0,1,2,3,4,5,6,7,8,9"
    for name in (
        "lesion-update",
        "preserve-update",
    ):  # each random control differs from its configuration only by the control
        assert {**configs[name], "mask_control": "random"} == configs[name + "-random"]
    assert s.train["dataset"] == str(BENCH / "task_train.jsonl") and s.eval["retention"] == [
        str(BENCH / "retention.txt")
    ]
    assert s.train["lora"] is False and s.reference == "full-ft"
    assert yaml.safe_load((BENCH / "sweep.yaml").read_text())["train"]["learning_rate"] == 3.0e-4
    assert json.dumps(s.eval)  # plain data, as done.json stores it


def test_selection_study_shares_the_benchmark_runs():
    """study.yaml (docs/experiments.md): the configurations it shares with sweep.yaml are the same runs (same train
    and eval options, so finished run folders are reused), each selection is read against a random control of the
    same networks, and every compared pair names configurations of the file."""
    bench, study = sweep.load(BENCH / "sweep.yaml"), sweep.load(BENCH / "study.yaml")
    b, s = dict(bench.configs), dict(study.configs)
    assert study.train == bench.train and study.eval == bench.eval and study.seeds == [1, 2, 3, 4, 5]
    shared = ["full-ft", "full-ft-lr3e-5", "lora", "lesion-update", "lesion-update-random"]
    assert all(s[name] == b[name] for name in shared)
    for prefix in ("", "lora-", "lr3e-5-"):
        assert {**s[prefix + "ica-top3"], "mask_control": "random"} == s[prefix + "random-top3"]
        assert s[prefix + "ica-top3"]["ica_component_ids"] == "top:3"
    for by in ("activation", "fisher"):
        for size in ("top3", "all10"):
            assert s[f"{by}-{size}"]["ica_template_path"].endswith(f"networks/{by}-{size}.json")
    assert all(a in s and z in s for a, z in study.compare)
