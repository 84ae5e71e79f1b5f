"""Functional-network templates: which neurons of which layers belong to each component.

On disk a template is versioned JSON (`"format": "fnscale-templates", "version": 1`), written
atomically. `Templates.load` also reads the `global_templates.json` of the reference
implementation (FunctionalNetworksSFT: `name`, `layout.captured_layers_sorted`,
`layout.hidden_size`, `templates.{component}.{layer}` -> channels; MLP-output channels), so its
users can bring their templates. Every refusal is a one-line `UsageError` that says the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnscale.config import SITES
from fnscale.errors import UsageError
from fnscale.runtime.atomic import atomic_path, write_json, write_text

FORMAT = "fnscale-templates"
VERSION = 1
SCOPES = ("global", "layer")
REFERENCE_FORMAT = "functionalnetworkssft"
_REBUILD = "rebuild it with `fnscale templates build`"


def _idx(values) -> np.ndarray:
    """Sorted unique int64 indices; refuses floats/bools rather than truncating them."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"neuron indices must be whole numbers, got {arr.dtype} values")
    return np.unique(arr.astype(np.int64).reshape(-1))


@dataclass
class Templates:
    """Per component, the selected neuron indices of each layer (sorted int64 arrays).

    `layers` are the model's layer indices that were captured, in the order they were
    concatenated; `num_layers` is the model's total layer count when known (fnscale records it,
    the reference format does not). For `scope="layer"` each component still maps
    layer -> neurons; it simply has neurons in one layer only.
    """

    layers: list[int]
    neurons_per_layer: int
    components: dict[int, dict[int, np.ndarray]]
    model: str | None = None
    site: str = "intermediate"
    scope: str = "global"
    n_components: int | None = None
    percentile: float | None = None
    kind: str = "temporal"
    datasets: list[str] = field(default_factory=list)
    token_counts: dict[str, int] = field(default_factory=dict)
    num_layers: int | None = None
    loadings: dict[int, dict[int, np.ndarray]] | None = None
    name: str | None = None
    source_format: str = "fnscale"
    control: dict | None = None  # set on random controls: {"kind": "random", "seed": S}
    selection: dict | None = (
        None  # set by `templates select`: how the neurons were chosen (selector, data, counts, seed)
    )
    ranking: dict | None = None  # set by `templates rank`: loss rise per lesioned component (see fnscale.networks.keys)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.neurons_per_layer = int(self.neurons_per_layer)
        self.components = {int(c): {int(l): _idx(v) for l, v in m.items()} for c, m in self.components.items()}
        if self.loadings is not None:
            self.loadings = {
                int(c): {int(l): np.asarray(v, dtype=np.float64) for l, v in m.items()}
                for c, m in self.loadings.items()
            }
        if self.n_components is None:
            self.n_components = len(self.components)
        self._validate()

    def _validate(self) -> None:
        if self.site not in SITES:
            raise UsageError(f"unknown capture site {self.site!r}; use one of {', '.join(SITES)}")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.neurons_per_layer < 1 or not self.layers or len(set(self.layers)) != len(self.layers):
            raise UsageError(
                "templates need >= 1 neuron per layer and a non-empty list of distinct layers, got "
                f"{self.neurons_per_layer} and {self.layers}"
            )
        if min(self.layers) < 0 or (self.num_layers is not None and max(self.layers) >= self.num_layers):
            raise UsageError(f"layer indices {self.layers} do not fit a model of {self.num_layers} layers")
        known = set(self.layers)
        for c, per_layer in self.components.items():
            for layer, idx in per_layer.items():
                if layer not in known:
                    raise UsageError(
                        f"component {c} names layer {layer}, which is not among the captured layers {self.layers}"
                    )
                bad = idx[(idx < 0) | (idx >= self.neurons_per_layer)]
                if bad.size:
                    raise UsageError(
                        f"component {c}, layer {layer} has neuron {int(bad[0])} outside 0..{self.neurons_per_layer - 1}"
                    )
                if (
                    self.loadings is not None
                    and c in self.loadings
                    and layer in self.loadings[c]
                    and self.loadings[c][layer].shape != idx.shape
                ):
                    raise UsageError(
                        f"component {c}, layer {layer}: {self.loadings[c][layer].size} loadings for {idx.size} neurons"
                    )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_masks(
        cls,
        flat_masks: Sequence[np.ndarray],
        layers: Sequence[int],
        neurons_per_layer: int,
        *,
        mixing: np.ndarray | None = None,
        **meta,
    ) -> Templates:
        """Map flat boolean masks (the layers concatenated in `layers` order) to (layer, neuron).

        `mixing` (flat neurons x k), when given, stores each selected neuron's loading.
        Other keyword arguments are the metadata fields (model, site, scope, percentile, ...).
        """
        layers = [int(x) for x in layers]
        width = int(neurons_per_layer)
        total = len(layers) * width
        comps: dict[int, dict[int, np.ndarray]] = {}
        loads: dict[int, dict[int, np.ndarray]] | None = {} if mixing is not None else None
        for c, mask in enumerate(flat_masks):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (total,):
                raise UsageError(
                    f"mask {c} has {mask.size} entries, expected {len(layers)} layers x {width} neurons = {total}"
                )
            flat = np.flatnonzero(mask)
            pos, neuron = np.divmod(flat, width)
            comps[c] = {layers[p]: neuron[pos == p] for p in np.unique(pos)}
            if loads is not None:
                loads[c] = {layers[p]: np.asarray(mixing[flat[pos == p], c], dtype=np.float64) for p in np.unique(pos)}
        meta.setdefault("n_components", len(comps))
        return cls(layers=layers, neurons_per_layer=width, components=comps, loadings=loads, **meta)

    @classmethod
    def from_decomposition(
        cls, dec, layers: Sequence[int], neurons_per_layer: int, *, with_loadings: bool = True, **meta
    ) -> Templates:
        """Templates from a `Decomposition` (global scope): its masks, percentile, kind, token count."""
        meta.setdefault("percentile", dec.percentile)
        meta.setdefault("kind", dec.kind)
        meta.setdefault("token_counts", {"total": int(dec.n_tokens)})
        return cls.from_masks(
            dec.masks, layers, neurons_per_layer, mixing=dec.mixing if with_loadings else None, **meta
        )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        comps = []
        for c in sorted(self.components):
            entry = {"id": c, "neurons": {str(l): self.components[c][l].tolist() for l in sorted(self.components[c])}}
            if self.loadings is not None and c in self.loadings:
                entry["loadings"] = {
                    str(l): [round(float(x), 6) for x in v] for l, v in sorted(self.loadings[c].items())
                }
            comps.append(entry)
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "name": self.name,
            "site": self.site,
            "scope": self.scope,
            "kind": self.kind,
            "layers": self.layers,
            "num_layers": self.num_layers,
            "neurons_per_layer": self.neurons_per_layer,
            "n_components": self.n_components,
            "percentile": self.percentile,
            "datasets": list(self.datasets),
            "token_counts": {str(k): int(v) for k, v in self.token_counts.items()},
            "imported_from": None if self.source_format == "fnscale" else self.source_format,
            "components": comps,
            **({"control": self.control} if self.control else {}),
            **({"selection": self.selection} if self.selection else {}),
            **({"ranking": self.ranking} if self.ranking else {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a reader never sees half a file)."""
        write_json(path, self.to_dict(), indent=1)
        return Path(path)

    def save_folder(self, folder: str | os.PathLike) -> dict[str, str]:
        """global_templates.json, coverage.txt and coverage.png in `folder`; their paths by role."""
        out = Path(folder)
        paths = {"path": str(self.save(out / "global_templates.json")), "coverage": str(out / "coverage.txt")}
        write_text(out / "coverage.txt", self.coverage_table() + "\n")
        paths["heatmap"] = str(self.save_heatmap(out / "coverage.png"))
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike) -> Templates:
        """Read an fnscale template or a FunctionalNetworksSFT global_templates.json (auto-detected)."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(
                f"template file {path} not found; fix the path or build one with `fnscale templates build`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not a text JSON file; {_REBUILD}") from None
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); {_REBUILD}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path} is not a template (expected a JSON object); {_REBUILD}")
        try:
            if "format" in data:
                if data["format"] != FORMAT:
                    raise UsageError(f"{path} has unknown format {data['format']!r} (expected {FORMAT!r}); {_REBUILD}")
                if data.get("version") != VERSION:
                    raise UsageError(
                        f"{path} is {FORMAT} version {data.get('version')!r}, this fnscale reads version {VERSION}; "
                        f"upgrade fnscale or {_REBUILD}"
                    )
                return cls._from_fnscale(data)
            if {"layout", "templates"} <= data.keys():
                return cls._from_reference(data)
        except UsageError as err:
            msg = str(err)
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            if "fnscale templates build" not in msg and "upgrade" not in msg:
                msg = f"{msg}; {_REBUILD}"
            raise UsageError(msg) from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UsageError(f"{path} is malformed ({type(err).__name__}: {err}); {_REBUILD}") from None
        raise UsageError(
            f"{path} is neither an fnscale template (no 'format' field) nor a FunctionalNetworksSFT "
            f"global_templates.json (no 'layout'/'templates'); {_REBUILD}"
        )

    @classmethod
    def _from_fnscale(cls, d: dict) -> Templates:
        comps = {int(e["id"]): e["neurons"] for e in d["components"]}
        loads = {int(e["id"]): e["loadings"] for e in d["components"] if "loadings" in e}
        return cls(
            layers=d["layers"],
            neurons_per_layer=d["neurons_per_layer"],
            components=comps,
            model=d.get("model"),
            name=d.get("name"),
            site=d.get("site", "intermediate"),
            scope=d.get("scope", "global"),
            kind=d.get("kind", "temporal"),
            n_components=d.get("n_components"),
            percentile=d.get("percentile"),
            datasets=list(d.get("datasets") or []),
            token_counts=dict(d.get("token_counts") or {}),
            num_layers=d.get("num_layers"),
            loadings=loads or None,
            source_format=d.get("imported_from") or "fnscale",
            control=d.get("control"),
            selection=d.get("selection"),
            ranking=d.get("ranking"),
        )

    @classmethod
    def _from_reference(cls, d: dict) -> Templates:
        layout = d["layout"]
        return cls(
            layers=layout["captured_layers_sorted"],
            neurons_per_layer=layout["hidden_size"],
            components={int(c): {int(l): v for l, v in m.items()} for c, m in d["templates"].items()},
            name=d.get("name"),
            site="mlp_output",  # the reference captures and masks MLP outputs (hidden-size channels)
            scope="global",
            source_format=REFERENCE_FORMAT,
        )

    # ------------------------------------------------------------------ use

    @property
    def component_ids(self) -> list[int]:
        return sorted(self.components)

    def component_neurons(self, ids: int | Iterable[int]) -> dict[int, np.ndarray]:
        """Union of the chosen components' neurons, for every captured layer (possibly empty).

        Layers outside `layers` are absent; whether an empty or absent layer is masked is the
        caller's policy (the reference leaves such layers unmasked in preserve mode).
        """
        ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
        if not ids:
            raise UsageError(f"choose at least one component id ({self._id_range()})")
        for c in ids:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) not in self.components:
                raise UsageError(f"component {c!r} is not in this template; choose ids from {self._id_range()}")
        out = {}
        for layer in self.layers:
            parts = [self.components[int(c)][layer] for c in ids if layer in self.components[int(c)]]
            out[layer] = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        return out

    def _id_range(self) -> str:
        ids = self.component_ids
        if ids == list(range(len(ids))):
            return f"0 to {len(ids) - 1}" if ids else "none: the template is empty"
        return ", ".join(map(str, ids))

    def check_compatible(self, num_layers: int, neurons_per_layer: int, site: str | None = None) -> None:
        """Refuse a model this template was not built for (layer count, width, capture site)."""
        if site is not None and site != self.site:
            raise UsageError(
                f"template was built at the {self.site!r} site, not {site!r}; use --site {self.site} or rebuild with "
                "`fnscale templates build`"
            )
        fits_layers = max(self.layers) < num_layers if self.num_layers is None else self.num_layers == num_layers
        if not fits_layers or int(neurons_per_layer) != self.neurons_per_layer:
            built = (
                f"{self.num_layers} layers"
                if self.num_layers is not None
                else f"layers {min(self.layers)}-{max(self.layers)}"
            )
            raise UsageError(
                f"template was built for {built} × {self.neurons_per_layer} neurons ({self.site}), "
                f"model has {num_layers} layers × {neurons_per_layer} neurons; rebuild with `fnscale templates build`"
            )

    # ------------------------------------------------------------------ reports

    def coverage(self) -> np.ndarray:
        """Neurons per component (rows, `component_ids` order) per layer (columns, `layers` order)."""
        return np.array(
            [[self.components[c].get(l, np.zeros(0)).size for l in self.layers] for c in self.component_ids],
            dtype=np.int64,
        ).reshape(len(self.components), len(self.layers))

    def coverage_table(self) -> str:
        """Text summary: per component the neurons in each layer, total, and share of all neurons."""
        cov = self.coverage()
        total = len(self.layers) * self.neurons_per_layer
        head = (
            f"templates: {self.model or self.name or '?'} | site {self.site} | scope {self.scope} | "
            f"{len(self.layers)} layers x {self.neurons_per_layer} neurons | {len(self.components)} components"
            + (f" | percentile {self.percentile:g}" if self.percentile is not None else "")
        )
        w = max(5, len(str(int(cov.max()) if cov.size else 0)) + 1, max(len(str(l)) for l in self.layers) + 2)
        cols = "".join(f"{'L' + str(l):>{w}}" for l in self.layers)
        lines = [head, f"{'comp':>5} {'neurons':>8} {'share':>7} {'layers':>6} |{cols}"]
        for row, c in zip(cov, self.component_ids):
            n = int(row.sum())
            lines.append(
                f"{c:>5} {n:>8} {100.0 * n / total:>6.2f}% {int((row > 0).sum()):>6} |"
                + "".join(f"{int(x):>{w}}" for x in row)
            )
        return "\n".join(lines) + "\n"

    def save_heatmap(self, path: str | os.PathLike) -> Path:
        """PNG heatmap: components x layers, colour = share of the layer's neurons selected."""
        return _save_heatmap(self, path)


def ranking_table(t: Templates) -> str:
    """The ranking `templates rank` recorded, most important first ("" when the file is not ranked)."""
    if not t.ranking:
        return ""
    r = t.ranking
    lines = [
        f"key networks: loss rise when each component is lesioned at inference on {', '.join(r['data'])} "
        f"({r['tokens']} scored tokens, base loss {r['base_loss']:.4f}), against {r['random_draws']} random lesions "
        f"of the same size per layer (seed {r['seed']})",
        f"{'rank':>4} {'comp':>5} {'neurons':>8} {'loss rise':>10} {'random rise':>12} {'ratio':>7}",
    ]
    for k, c in enumerate(r["components"], 1):
        ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}"
        lines.append(f"{k:>4} {c['id']:>5} {c['neurons']:>8} {c['rise']:>+10.4f} {c['random_rise']:>+12.4f} {ratio:>7}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    """Hungarian matching of two templates' components by IoU of their (layer, neuron) sets."""

    iou: np.ndarray  # (components of a) x (components of b)
    ids_a: list[int]
    ids_b: list[int]
    pairs: list[tuple[int, int, float]]  # (id in a, id in b, IoU), one-to-one, maximising total IoU
    sizes_a: list[int]
    sizes_b: list[int]

    @property
    def mean_iou(self) -> float:
        return float(np.mean([p[2] for p in self.pairs])) if self.pairs else 0.0

    def table(self) -> str:
        lines = [f"{'a':>4} {'b':>4} {'IoU':>6} {'|a|':>7} {'|b|':>7} {'best b':>7} {'best IoU':>8}"]
        pos_a = {c: i for i, c in enumerate(self.ids_a)}
        pos_b = {c: j for j, c in enumerate(self.ids_b)}
        for ca, cb, v in self.pairs:
            i = pos_a[ca]
            jb = int(np.argmax(self.iou[i]))
            lines.append(
                f"{ca:>4} {cb:>4} {v:>6.3f} {self.sizes_a[i]:>7} {self.sizes_b[pos_b[cb]]:>7} {self.ids_b[jb]:>7} "
                f"{self.iou[i, jb]:>8.3f}"
            )
        lines.append(f"mean IoU of {len(self.pairs)} matched components: {self.mean_iou:.3f}")
        return "\n".join(lines) + "\n"


def _keys(t: Templates, c: int) -> np.ndarray:
    parts = [np.int64(l) * t.neurons_per_layer + v for l, v in t.components[c].items()]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def compare(a: Templates, b: Templates) -> Comparison:
    """Best one-to-one match of a's and b's components (scipy's linear_sum_assignment on IoU)."""
    from scipy.optimize import linear_sum_assignment

    if a.neurons_per_layer != b.neurons_per_layer:
        raise UsageError(
            f"cannot compare templates of {a.neurons_per_layer} and {b.neurons_per_layer} neurons per layer; "
            "they come from different models or capture sites"
        )
    ka, kb = [_keys(a, c) for c in a.component_ids], [_keys(b, c) for c in b.component_ids]
    iou = np.zeros((len(ka), len(kb)))
    for i, x in enumerate(ka):
        for j, y in enumerate(kb):
            inter = np.intersect1d(x, y, assume_unique=True).size
            union = x.size + y.size - inter
            iou[i, j] = inter / union if union else 0.0
    rows, cols = linear_sum_assignment(-iou) if iou.size else (np.zeros(0, int), np.zeros(0, int))
    pairs = [(a.component_ids[i], b.component_ids[j], float(iou[i, j])) for i, j in zip(rows, cols)]
    return Comparison(iou, a.component_ids, b.component_ids, pairs, [x.size for x in ka], [y.size for y in kb])


def _save_heatmap(t: Templates, path: str | os.PathLike) -> Path:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no GUI

    share = t.coverage() / t.neurons_per_layer
    fig = Figure(figsize=(max(4.0, 0.3 * len(t.layers) + 2), max(3.0, 0.3 * len(t.components) + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("component")
    step = max(1, len(t.layers) // 16)
    ax.set_xticks(range(0, len(t.layers), step), [str(l) for l in t.layers[::step]])
    ystep = max(1, len(t.components) // 20)
    ax.set_yticks(range(0, len(t.components), ystep), [str(c) for c in t.component_ids[::ystep]])
    ax.set_title(f"{t.model or t.name or 'templates'}: share of neurons per layer ({t.site})", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of layer's neurons")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
