"""Activation capture on tiny Llama and GPT-2, the template-building recipe, and the templates CLI round trip."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_cuml import install as install_cuml_standin
from transformers import AutoModelForCausalLM

from fnscale.errors import UsageError
from fnscale.networks.capture import ActivationCapture
from fnscale.networks.templates import Templates, compare
from fnscale.preflight import parse_layers
from fnscale.recipes.build_networks import build_templates


def test_parse_layers():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("all", 2) == [0, 1]
    for bad in ("0-9", "x", "3"):
        with pytest.raises(UsageError):
            parse_layers(bad, 3)


def _padded(seqs, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids, attn


@pytest.mark.parametrize(
    "fixture, site, width",
    [
        ("tiny_llama", "intermediate", 64),
        ("tiny_gpt2", "intermediate", 128),
        ("tiny_llama", "mlp_output", 32),
        ("tiny_gpt2", "mlp_output", 32),
    ],
)
def test_capture_keeps_real_tokens_only(request, fixture, site, width):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    with ActivationCapture(model, site=site) as cap:
        batched = cap.run(*_padded(seqs))
        single = np.concatenate([cap.run(*_padded([s])) for s in seqs])
    assert batched.shape == (sum(map(len, seqs)), 2 * width)
    np.testing.assert_allclose(batched, single, atol=1e-5)  # padding removed, right-padding leaves real tokens alone
    # independent check of the first layer against the module's own input/output
    seen = {}
    layer = model.model.layers[0].mlp if fixture == "tiny_llama" else model.transformer.h[0].mlp
    target = (layer.down_proj if fixture == "tiny_llama" else layer.c_proj) if site == "intermediate" else layer
    if site == "intermediate":
        h = target.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    else:
        h = target.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    ids, attn = _padded(seqs[:1])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn)
    h.remove()
    np.testing.assert_allclose(batched[:5, :width], seen["x"][0].numpy(), atol=1e-6)


@pytest.mark.parametrize("site, layers", [("intermediate", None), ("mlp_output", [0])])
def test_capture_stops_early_with_the_same_activations(tiny_llama, site, layers):
    """stop_early skips the layers after the last captured one and the LM head, and captures exactly what a full forward does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    heads = []
    h = model.lm_head.register_forward_hook(lambda m, a, o: heads.append(1))
    ids, attn = _padded([[5, 6, 7, 8, 9], [10, 11]])
    with ActivationCapture(model, site=site, layers=layers, stop_early=False) as cap:
        full = cap.run(ids, attn)
    assert len(heads) == 1
    with ActivationCapture(model, site=site, layers=layers) as cap:
        early = cap.run(ids, attn)
        cap.dummy("cpu")  # a throw-away forward still runs to the end
    h.remove()
    assert len(heads) == 2
    np.testing.assert_array_equal(early, full)


def _samples(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, 60, size=rng.integers(6, 20))) for _ in range(n)]


def test_build_templates_single_process_and_cache(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    kw = dict(n_components=4, percentile=90.0, batch_size=8, seed=0, progress=False, model_name="tiny")
    t = build_templates(model, _samples(), **kw)
    assert t.n_components == 4 and t.layers == [0, 1] and t.neurons_per_layer == 64 and t.num_layers == 2
    for c in range(4):
        n = sum(len(v) for v in t.components[c].values())
        assert 0.05 * 128 <= n <= 0.2 * 128  # ~10% of 128 neurons pass the 90th percentile
    # statistics and PCA share one pass; the activation cache (auto: it fits) replaces the projection's forwards
    calls = {"n": 0}
    h = model.model.embed_tokens.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    streamed = build_templates(model, _samples(), cache_budget_gb=0, **kw)
    assert calls["n"] == 12  # 48 samples / batch 8: two passes of forwards, not three
    cached = build_templates(model, _samples(), cache_budget_gb=1.0, **kw)
    h.remove()
    assert calls["n"] == 12 + 6  # one pass
    for c in range(4):
        for layer in (0, 1):
            assert np.array_equal(t.components[c].get(layer, []), cached.components[c].get(layer, []))
            assert np.array_equal(t.components[c].get(layer, []), streamed.components[c].get(layer, []))


def _pca_of_build(model, monkeypatch, **kw):
    """build_templates, plus the merged PCA state its decomposition finished with."""
    from fnscale.networks.decompose import StreamingDecomposer

    states, finish = [], StreamingDecomposer.finish
    monkeypatch.setattr(
        StreamingDecomposer, "finish", lambda self, z: (states.append(self.pca_state()), finish(self, z))[1]
    )
    t = build_templates(model, _samples(), n_components=4, percentile=90.0, batch_size=8, seed=0, progress=False, **kw)
    monkeypatch.setattr(StreamingDecomposer, "finish", finish)
    return t, states[0]


def test_build_templates_runs_cuml_when_asked(tiny_llama, monkeypatch):
    """`--pca-backend cuml`, and `auto` with cuML and CUDA present, run cuML (the stand-in, tests/helpers_cuml.py) in
    the path `templates build` takes (statistics folded into the PCA pass): it fits every batch. Its top-4 principal
    subspace and explained variance ratios match the numpy backend's and the exact SVD of all standardised
    activations within the streaming truncation's error on this nearly flat spectrum (the numpy path itself is at
    cosine 0.9988 and 0.6% from exact): cosines >= 0.998, ratios within rtol 1e-2. (Masks are no fair comparison on a
    random tiny model: with a flat spectrum the ICA rotation is ill-posed.)"""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    _, ref = _pca_of_build(model, monkeypatch, backend="numpy")
    with ActivationCapture(model) as cap:
        x = torch.cat([torch.as_tensor(cap.run(*_padded([s]))) for s in _samples()]).double().numpy()
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    s, vt = np.linalg.svd(xs, full_matrices=False)[1:]
    fed = install_cuml_standin(monkeypatch)
    for backend in ("cuml", "auto"):
        before = len(fed)
        _, st = _pca_of_build(model, monkeypatch, backend=backend)
        assert sum(fed[before:]) == len(x)
        for other in (ref.components_[:4], vt[:4]):
            assert np.linalg.svd(st.components_[:4] @ other.T, compute_uv=False).min() >= 0.998
        np.testing.assert_allclose(st.explained_variance_ratio_[:4], ref.explained_variance_ratio_[:4], rtol=1e-2)
        np.testing.assert_allclose(st.explained_variance_ratio_[:4], s[:4] ** 2 / (s**2).sum(), rtol=1e-2)


@pytest.mark.parametrize("budget", [0, 1.0])
def test_activations_reach_the_pca_as_tensors_without_host_copies(tiny_llama, monkeypatch, budget):
    """With the torch backend, activations go from the hooks through statistics and PCA as tensors on the model's
    device: no activation matrix is converted to numpy or copied with .cpu() on the way (on a GPU each would stall
    it); with the cache on, only its float16 values go to host memory. The networks equal the numpy backend's."""
    from torch.overrides import TorchFunctionMode

    from fnscale.networks.decompose import StreamingDecomposer

    host = (torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__, torch.Tensor.tolist)
    copies = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            t = args[0] if args else None
            # tokens x neurons: activations (every batch has > 24 tokens); PCA states (k' = 24 rows x neurons) are
            # exported to the host by design, the merges run there
            if func in host and isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[0] > 24 and t.shape[1] >= 64:
                copies.append(t.dtype)
            return func(*args, **(kwargs or {}))

    seen = []
    for name in ("update", "project"):
        original = getattr(StreamingDecomposer, name)
        monkeypatch.setattr(
            StreamingDecomposer,
            name,
            lambda self, b, _f=original: (seen.append((type(b), getattr(b, "device", None))), _f(self, b))[1],
        )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    kw = dict(n_components=4, percentile=90.0, batch_size=8, seed=0, progress=False, cache_budget_gb=budget)
    with Watch():
        t = build_templates(model, _samples(), backend="torch", **kw)
    assert copies == ([torch.float16] * 6 if budget else [])  # 6 batches cached as float16, or nothing
    assert len(seen) == 12 and set(seen) == {(torch.Tensor, torch.device("cpu"))}
    ref = build_templates(model, _samples(), backend="numpy", **kw)
    ious = [iou for _, _, iou in compare(ref, t).pairs]
    assert len(ious) == 4 and min(ious) >= 0.99, ious


def test_capture_device_is_read_from_the_model(tiny_llama):
    """Capture batches go where the model's input embeddings are, not to the accelerator's device: a model that is
    not placed yet (networks computed inside a training run, issue 20 item 1) is captured where it is. Here the
    accelerator says CUDA (absent on this machine) and the model is on the CPU: ae41823 sent the batches to CUDA."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    on_gpu = SimpleNamespace(
        process_index=0, num_processes=1, device=torch.device("cuda"), distributed_type=DistributedType.NO
    )
    t = build_templates(model, _samples(), n_components=4, percentile=90.0, accelerator=on_gpu, progress=False)
    assert t.n_components == 4

    from fnscale.recipes.build_networks import _input_device

    assert _input_device(model, on_gpu) == torch.device("cpu")
    model.model.embed_tokens.to("meta")  # offloaded embeddings: accelerate's hooks move the inputs
    assert _input_device(model, on_gpu) == torch.device("cuda") and _input_device(model, None) == torch.device("cpu")
    assert _input_device(torch.nn.Sequential(torch.nn.Linear(2, 2)), on_gpu) == torch.device("cpu")  # no embeddings


def test_layer_scope_and_spatial(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    t = build_templates(model, _samples(), n_components=3, percentile=95.0, scope="layer", progress=False)
    assert t.n_components == 6 and all(len(m) == 1 for m in t.components.values())
    s = build_templates(
        model, _samples(), n_components=3, percentile=95.0, kind="spatial", site="mlp_output", progress=False
    )
    assert s.site == "mlp_output" and s.neurons_per_layer == 32


def test_zero_samples_and_too_many_components(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(UsageError, match="no samples"):
        build_templates(model, [], n_components=2, progress=False)
    with pytest.raises(UsageError, match="n_components|components"):
        build_templates(model, _samples(2), n_components=100, progress=False)


def test_templates_cli_round_trip(tiny_llama, sft_file, tmp_path):
    from fnscale.cli.app import cli

    runner = CliRunner()
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--components", "3", "--percentile", "95", "--samples-per-dataset", "16", "--max-seq-length", "48"]
    r1 = runner.invoke(cli, ["templates", "build", tiny_llama, sft_file, sft_file, "--output", str(a), *common])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(
        cli, ["templates", "build", "--model", tiny_llama, "--dataset", sft_file, sft_file, "--output", str(b), *common]
    )
    assert r2.exit_code == 0, r2.output
    for d in (a, b):
        assert {p.name for p in d.iterdir()} >= {"global_templates.json", "coverage.txt", "coverage.png"}
    ta, tb = Templates.load(a / "global_templates.json"), Templates.load(b / "global_templates.json")
    assert ta.model == tiny_llama.rstrip("/").split("/")[-1] and ta.datasets == [sft_file, sft_file]
    show = runner.invoke(cli, ["templates", "show", str(a / "global_templates.json")])
    assert show.exit_code == 0 and "components: 3" in show.output and "L0" in show.output
    cmp = runner.invoke(
        cli, ["templates", "compare", str(a / "global_templates.json"), str(b / "global_templates.json")]
    )
    assert cmp.exit_code == 0 and "mean IoU of 3 matched components: 1.000" in cmp.output
    assert [ta.components[c].keys() for c in range(3)] == [tb.components[c].keys() for c in range(3)]


def test_templates_build_config_file_and_flags(tiny_llama, sft_file, tmp_path):
    """--config supplies options (model and datasets too); flags given on the command line beat it."""
    import yaml

    from fnscale.cli.app import cli

    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": tiny_llama,
                "dataset": [sft_file],
                "components": 2,
                "percentile": 95,
                "samples-per-dataset": 12,
                "max_seq_length": 48,
                "output": str(tmp_path / "from_yaml"),
            }
        )
    )
    res = CliRunner().invoke(
        cli, ["templates", "build", "--config", str(cfg), "--components", "3", "--output", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    t = Templates.load(tmp_path / "o" / "global_templates.json")
    assert t.n_components == 3 and t.percentile == 95 and t.datasets == [sft_file]
    assert t.model == tiny_llama.rstrip("/").split("/")[-1] and not (tmp_path / "from_yaml").exists()
    cfg.write_text("componentz: 3\n")
    bad = CliRunner().invoke(cli, ["templates", "build", "--config", str(cfg)])
    assert (
        bad.exit_code == 2
        and "unknown option(s) in config file: componentz; see `fnscale templates build --help`" in bad.output
    )


@pytest.mark.parametrize(
    "args,model,datasets",
    [
        (("M", ("a", "b"), None, ()), "M", ["a", "b"]),  # templates build M a b
        (("a", ("b",), "M", ()), "M", ["a", "b"]),  # templates build --model M a b
        (("b", (), "M", ("a",)), "M", ["a", "b"]),  # templates build --model M --dataset a b
        (("M", ("b",), None, ("a",)), "M", ["a", "b"]),  # templates build --dataset a M b
        ((None, (), None, ()), None, []),
    ],
)
def test_templates_build_positional_and_named_forms(args, model, datasets):
    from fnscale.cli.templates import model_and_datasets

    assert model_and_datasets(*args) == (model, datasets)


def test_templates_build_reads_custom_columns_like_train(tiny_llama, sft_file, tmp_path):
    """Data that `train` reads with --prompt-column/--response-column is read the same way by `templates build`."""
    import json

    from fnscale.cli.app import cli

    rows = [json.loads(line) for line in open(sft_file)]
    custom = tmp_path / "custom.jsonl"
    custom.write_text("".join(json.dumps({"ask": r["instruction"], "say": r["output"]}) + "\n" for r in rows))
    common = [
        "--model",
        tiny_llama,
        "--dataset",
        str(custom),
        "--components",
        "2",
        "--percentile",
        "95",
        "--samples-per-dataset",
        "12",
        "--max-seq-length",
        "48",
    ]
    refused = CliRunner().invoke(cli, ["templates", "build", *common, "--output", str(tmp_path / "no")])
    assert refused.exit_code == 2 and "ask" in refused.output, refused.output
    res = CliRunner().invoke(
        cli,
        [
            "templates",
            "build",
            *common,
            "--prompt-column",
            "ask",
            "--response-column",
            "say",
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert Templates.load(tmp_path / "o" / "global_templates.json").n_components == 2
