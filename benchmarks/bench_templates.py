"""Templates build vs one plain forward pass over the same samples (the physical floor), in one run.

Each configuration runs in its own subprocess, so peak RSS is per configuration. Wall time and the process's
CPU time are both printed: on a shared machine the CPU-time ratios (single-threaded runs) are the steadier ones.
  forward   one forward pass over the samples, nothing captured
  default   `templates build` defaults (--cache-budget-gb auto)
  stream    --cache-budget-gb 0 (no cache: statistics+PCA pass, projection pass)

    python benchmarks/bench_templates.py --samples 50 200          # SmolLM2-135M (embedded), 128-token samples
    python benchmarks/bench_templates.py --tiny --samples 8 16      # CI smoke: a tiny random Llama
    python benchmarks/bench_templates.py --device cuda --pca-backend cuml   # on a GPU: capture and PCA stay there
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _model(tiny: bool):
    import torch

    from fnscale.models import loading

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        return LlamaForCausalLM(cfg).eval(), 256
    source = loading.resolve_model(None)
    model = loading.load_model(source, torch.float32).eval()
    return model, model.config.vocab_size


def _child(
    mode: str, n_samples: int, seq: int, tiny: bool, site: str, components: int, device: str, backend: str
) -> dict:
    import numpy as np
    import psutil
    import torch

    from fnscale.recipes.build_networks import _batches, build_templates

    model, vocab = _model(tiny)
    model.to(device)
    rng = np.random.default_rng(0)
    samples = [list(rng.integers(10, vocab, size=seq)) for _ in range(n_samples)]
    rss_model = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "forward":
        with torch.no_grad():
            for ids, attn in _batches(samples, 1, 0, device):
                model(input_ids=ids, attention_mask=attn, use_cache=False)
    else:
        budget = "auto" if mode == "default" else 0
        build_templates(
            model,
            samples,
            n_components=components,
            percentile=98.0,
            site=site,
            batch_size=1,
            cache_budget_gb=budget,
            backend=backend,
            progress=False,
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "samples": n_samples,
        "tokens": n_samples * seq,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_gb": peak / 2**30,
        "above_model_gb": (peak - rss_model) / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[50, 200], help="sample counts (each --seq tokens)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--site", default="mlp_output")
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M (CI smoke)")
    p.add_argument("--device", default="cpu", help="where the model runs (cuda: capture and PCA stay on the GPU)")
    p.add_argument("--pca-backend", default="auto", help="auto, cuml, torch or numpy")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.samples[0], a.seq, a.tiny, a.site, a.components, a.device, a.pca_backend)))
        return
    rows = []
    for n in a.samples:
        for mode in ("forward", "default", "stream"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--samples",
                str(n),
                "--seq",
                str(a.seq),
                "--site",
                a.site,
                "--components",
                str(a.components),
                "--device",
                a.device,
                "--pca-backend",
                a.pca_backend,
            ]
            cmd += ["--tiny"] if a.tiny else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(
                f"  {mode:8s} {n:5d} samples: {rows[-1]['seconds']:.1f} s wall, {rows[-1]['cpu_seconds']:.1f} s CPU",
                file=sys.stderr,
                flush=True,
            )
    _table(rows, a.samples, "seconds", "wall time")
    _table(rows, a.samples, "cpu_seconds", "CPU time")


def _table(rows: list[dict], samples: list[int], key: str, what: str) -> None:
    print(f"\n{what}:")
    print(
        "| tokens | forward alone | default (auto) | stream (--cache-budget-gb 0) | peak RSS forward / default / "
        "stream | above model default / stream |"
    )
    print("|---|---|---|---|---|---|")
    for n in samples:
        r = {x["mode"]: x for x in rows if x["samples"] == n}
        f, d, s = (r[m][key] for m in ("forward", "default", "stream"))
        print(
            f"| {r['forward']['tokens']:,} | {f:.1f} s | {d:.1f} s ({d / f:.2f}x) | {s:.1f} s ({s / f:.2f}x) "
            f"| {r['forward']['peak_rss_gb']:.2f} / {r['default']['peak_rss_gb']:.2f} / "
            f"{r['stream']['peak_rss_gb']:.2f} GB "
            f"| {r['default']['above_model_gb']:.2f} / {r['stream']['above_model_gb']:.2f} GB |"
        )


if __name__ == "__main__":
    main()
