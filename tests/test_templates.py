"""Templates: round trip, reference import, refusals, reports, comparison."""

import json

import numpy as np
import pytest

from fnscale.errors import UsageError
from fnscale.networks import Templates, compare, decompose
from fnscale.networks.templates import REFERENCE_FORMAT


def _masks(layers=(0, 2, 5), width=10):
    """Three flat masks over 3 layers x 10 neurons (layers concatenated in order)."""
    d = len(layers) * width
    m = np.zeros((3, d), dtype=bool)
    m[0, [0, 3, 11, 29]] = True  # layer 0: 0, 3; layer 2: 1; layer 5: 9
    m[1, [3, 4, 25]] = True  # layer 0: 3, 4; layer 5: 5
    m[2, [12, 13, 14]] = True  # layer 2 only
    return m


def _templates(**kw):
    mixing = np.arange(30 * 3, dtype=float).reshape(30, 3) / 10
    meta = dict(
        model="tiny-llama",
        site="intermediate",
        scope="global",
        percentile=98.0,
        datasets=["alpaca"],
        token_counts={"alpaca": 1234},
        num_layers=6,
    )
    meta.update(kw)
    return Templates.from_masks(_masks(), [0, 2, 5], 10, mixing=mixing, **meta)


def test_from_masks_maps_flat_indices_to_layer_neurons():
    t = _templates()
    assert {l: v.tolist() for l, v in t.components[0].items()} == {0: [0, 3], 2: [1], 5: [9]}
    assert {l: v.tolist() for l, v in t.components[2].items()} == {2: [2, 3, 4]}
    assert t.loadings[0][5].tolist() == [29 * 3 / 10]  # loading of flat neuron 29, component 0
    union = t.component_neurons([0, 1])
    assert {l: v.tolist() for l, v in union.items()} == {0: [0, 3, 4], 2: [1], 5: [5, 9]}
    assert t.component_neurons(2)[0].size == 0  # captured layer without neurons: present, empty
    with pytest.raises(UsageError, match="mask 0 has 5 entries, expected 3 layers x 10 neurons = 30"):
        Templates.from_masks([np.zeros(5, bool)], [0, 2, 5], 10)


def test_save_load_round_trip(tmp_path):
    t = _templates()
    path = t.save(tmp_path / "sub" / "templates.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "fnscale-templates" and raw["version"] == 1
    assert raw["components"][0]["neurons"] == {"0": [0, 3], "2": [1], "5": [9]}
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file
    u = Templates.load(path)
    for field in (
        "model",
        "site",
        "scope",
        "layers",
        "neurons_per_layer",
        "n_components",
        "percentile",
        "datasets",
        "token_counts",
        "num_layers",
        "kind",
        "source_format",
    ):
        assert getattr(u, field) == getattr(t, field), field
    for c in t.component_ids:
        assert {l: v.tolist() for l, v in u.components[c].items()} == {
            l: v.tolist() for l, v in t.components[c].items()
        }
        for l in t.loadings[c]:
            np.testing.assert_allclose(u.loadings[c][l], t.loadings[c][l], atol=1e-6)


def test_reference_global_templates_import(tmp_path):
    ref = {
        "name": "global_templates_v1",
        "layout": {"captured_layers_sorted": [0, 1, 2, 3], "hidden_size": 16},
        "templates": {"0": {"0": [1, 2, 3], "3": [15]}, "1": {"1": [4, 5]}, "2": {}},
    }
    path = tmp_path / "global_templates.json"
    path.write_text(json.dumps(ref))
    t = Templates.load(path)
    assert t.source_format == REFERENCE_FORMAT and t.site == "mlp_output" and t.scope == "global"
    assert t.layers == [0, 1, 2, 3] and t.neurons_per_layer == 16 and t.name == "global_templates_v1"
    assert t.component_ids == [0, 1, 2] and t.n_components == 3
    assert {l: v.tolist() for l, v in t.component_neurons([0, 1]).items()} == {0: [1, 2, 3], 1: [4, 5], 2: [], 3: [15]}
    t.check_compatible(4, 16)
    t.check_compatible(12, 16)  # the reference may capture a subset of layers
    with pytest.raises(UsageError, match=r"built for layers 0-3 × 16 neurons \(mlp_output\), model has 2 layers × 16"):
        t.check_compatible(2, 16)
    # converting to the fnscale format keeps the content and remembers the origin
    u = Templates.load(t.save(tmp_path / "converted.json"))
    assert u.source_format == REFERENCE_FORMAT and u.component_ids == [0, 1, 2]


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", r"is not valid JSON \(line 1"),
        ("[1, 2]", "is not a template"),
        (json.dumps({"format": "something-else", "version": 1}), "unknown format 'something-else'"),
        (json.dumps({"format": "fnscale-templates", "version": 2}), "version 2, this fnscale reads version 1"),
        (json.dumps({"hello": 1}), "neither an fnscale template"),
        (json.dumps({"format": "fnscale-templates", "version": 1, "layers": [0]}), "is malformed"),
        (
            json.dumps({"layout": {"captured_layers_sorted": [0], "hidden_size": 4}, "templates": {"0": {"0": [7]}}}),
            "neuron 7 outside 0..3",
        ),
        (
            json.dumps({"layout": {"captured_layers_sorted": [0], "hidden_size": 4}, "templates": {"0": {"1": [2]}}}),
            "names layer 1, which is not among the captured layers",
        ),
        (
            json.dumps({"layout": {"captured_layers_sorted": [0], "hidden_size": 4}, "templates": {"0": {"0": [1.5]}}}),
            "whole numbers",
        ),
    ],
)
def test_load_refusals(tmp_path, content, match):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=match) as info:
        Templates.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert "fnscale templates build" in msg or "upgrade" in msg


def test_missing_file_and_component_and_model_refusals(tmp_path):
    with pytest.raises(UsageError, match="not found; fix the path or build one with `fnscale templates build`"):
        Templates.load(tmp_path / "nope.json")
    t = _templates()
    with pytest.raises(UsageError, match="component 3 is not in this template; choose ids from 0 to 2"):
        t.component_neurons([0, 3])
    with pytest.raises(UsageError, match="component -1 is not in this template"):
        t.component_neurons(-1)
    with pytest.raises(UsageError, match="at least one component"):
        t.component_neurons([])
    t.check_compatible(6, 10)
    with pytest.raises(
        UsageError,
        match=r"built for 6 layers × 10 neurons \(intermediate\), model has 32 layers × 10 neurons; rebuild with `fnscale templates build`",
    ):
        t.check_compatible(32, 10)
    with pytest.raises(UsageError, match=r"model has 6 layers × 8192 neurons"):
        t.check_compatible(6, 8192)
    with pytest.raises(UsageError, match="'intermediate' site, not 'mlp_output'"):
        t.check_compatible(6, 10, site="mlp_output")
    with pytest.raises(UsageError, match="unknown capture site 'attn'"):
        _templates(site="attn")
    with pytest.raises(UsageError, match="do not fit a model of 4 layers"):
        _templates(num_layers=4)


def test_coverage_table_and_heatmap(tmp_path):
    t = _templates()
    np.testing.assert_array_equal(t.coverage(), [[2, 1, 1], [2, 0, 1], [0, 3, 0]])
    table = t.coverage_table()
    lines = table.splitlines()
    assert "tiny-llama" in lines[0] and "3 layers x 10 neurons" in lines[0]
    assert lines[1].split()[:4] == ["comp", "neurons", "share", "layers"] and "L5" in lines[1]
    assert lines[2].split() == ["0", "4", "13.33%", "3", "|", "2", "1", "1"]
    assert lines[4].split() == ["2", "3", "10.00%", "1", "|", "0", "3", "0"]
    png = t.save_heatmap(tmp_path / "heat.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_compare_hungarian_iou():
    a = _templates()
    m = _masks()
    b = Templates.from_masks([m[2], m[0], m[1] | np.eye(1, 30, 20, dtype=bool)[0]], [0, 2, 5], 10)
    cmp = compare(a, b)
    assert cmp.iou.shape == (3, 3)
    assert [(p[0], p[1]) for p in cmp.pairs] == [(0, 1), (1, 2), (2, 0)]
    assert [round(p[2], 3) for p in cmp.pairs] == [1.0, 0.75, 1.0]  # {3,4,25} vs {3,4,20,25}
    assert cmp.mean_iou == pytest.approx((1 + 0.75 + 1) / 3)
    text = cmp.table()
    assert "mean IoU of 3 matched components: 0.917" in text
    other = Templates.from_masks([np.ones(8, bool)], [0], 8)
    with pytest.raises(UsageError, match="different models or capture sites"):
        compare(a, other)


def test_from_decomposition_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    layers, width = [1, 3], 250
    A = np.zeros((500, 4))
    for c in range(4):
        A[rng.choice(500, 10, replace=False), c] = 2.0
    x = rng.laplace(size=(1500, 4)) @ A.T + 0.5 * rng.normal(size=(1500, 500))
    dec = decompose([x[:700], x[700:]], 4, backend="numpy")
    t = Templates.from_decomposition(dec, layers, width, model="toy", num_layers=4)
    assert t.percentile == 98.0 and t.token_counts == {"total": 1500}
    assert sum(t.coverage().sum(1)) == sum(int(m.sum()) for m in dec.masks)
    u = Templates.load(t.save(tmp_path / "t.json"))
    assert compare(t, u).mean_iou == 1.0
