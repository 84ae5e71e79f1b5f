"""Where SFT data comes from: local files, folders, globs and gzip'd JSONL, or hub datasets with config and split.

A dataset spec is `PATH_OR_NAME[:CONFIG[:SPLIT]][:WEIGHT]`: a trailing number is the weight, hub names take
an optional config and split (`gsm8k:main:train`, `squad::validation`), local data takes only a weight
(`old.jsonl:0.2`). A `.yaml` spec (or a YAML `dataset:` list) holds mappings `{path, config, split, weight,
schema, columns, samples}`. Everything is read through `datasets`, so Arrow files are cached and memory-mapped.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fnscale.errors import UsageError

DEFAULT_DATASET = "default"
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}
WRAPPER_KEYS = ("data", "train", "examples", "rows")  # {"data": [...]} style .json files
SPEC_KEYS = ("path", "config", "split", "weight", "schema", "columns", "samples")


def default_dataset_path() -> Path:
    return Path(__file__).parent.parent / "sample_data" / "default_sft.jsonl"


def default_retention_path() -> Path:
    return Path(__file__).parent.parent / "sample_data" / "retention.txt"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run: where it is, how much of it to use, and (optionally) its own schema and columns."""

    path: str
    config: str | None = None
    split: str = "train"
    weight: float = 1.0  # examples used = weight x examples (0.2: a seeded fifth; 2: each twice)
    schema: str | None = None  # None: the run's --schema
    columns: dict = field(default_factory=dict)  # {prompt: "col" or "a,b", response: "col"}
    samples: int | None = None  # templates build: examples drawn from this dataset (None: --samples-per-dataset)
    label: str = ""  # the name used in summaries and metrics

    @property
    def name(self) -> str:
        return self.label or self.path


def _data_suffix(path: str | Path) -> str:
    """.json/.jsonl/.csv/.parquet/.txt, looking through a trailing .gz."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def _is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path)) or _data_suffix(path) in BUILDERS or any(c in path for c in "*?[")


def parse_spec(spec) -> DatasetSpec:
    """A DatasetSpec from a spec string, a YAML mapping, or a DatasetSpec."""
    if isinstance(spec, DatasetSpec):
        return spec
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown or "path" not in spec:
            raise UsageError(
                f"dataset entry {spec}: needs `path`, may have {', '.join(SPEC_KEYS[1:])}; unknown: {unknown}"
            )
        base = parse_spec(str(spec["path"]))
        weight = float(spec.get("weight", base.weight))
        _check_weight(weight, spec)
        return DatasetSpec(
            base.path,
            spec.get("config", base.config),
            spec.get("split", base.split),
            weight,
            spec.get("schema"),
            dict(spec.get("columns") or {}),
            spec.get("samples"),
            str(spec["path"]),
        )
    spec = str(spec or DEFAULT_DATASET)
    if spec == DEFAULT_DATASET:
        return DatasetSpec(str(default_dataset_path()), label=DEFAULT_DATASET)
    if os.path.exists(os.path.expanduser(spec)):
        return DatasetSpec(spec, label=spec)
    parts, weight = spec.split(":"), 1.0
    if len(parts) > 1 and _is_number(parts[-1]):
        weight = float(parts.pop())
        _check_weight(weight, spec)
    path, rest = parts[0], parts[1:]
    if _is_local(path) and rest:
        raise UsageError(
            f"dataset {spec!r}: local data takes only a weight (path:0.5); config and split are for hub names"
        )
    if len(rest) > 2:
        raise UsageError(f"dataset {spec!r}: expected NAME[:CONFIG[:SPLIT]][:WEIGHT]")
    config = rest[0] or None if rest else None
    split = rest[1] if len(rest) > 1 and rest[1] else "train"
    return DatasetSpec(path, config, split, weight, label=":".join(parts))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_weight(weight: float, spec) -> None:
    if not weight > 0:
        raise UsageError(f"dataset {spec}: weight {weight} must be positive")


def expand_specs(sources) -> list[DatasetSpec]:
    """Specs from one spec, a list of them, or .yaml files listing them; the bundled data when none."""
    if sources is None or isinstance(sources, (str, dict, DatasetSpec)):
        sources = [sources] if sources else []
    specs = []
    for s in sources:
        if isinstance(s, str) and s.lower().endswith((".yaml", ".yml")):
            specs.extend(parse_spec(e) for e in _read_spec_list(s))
        else:
            specs.append(parse_spec(s))
    return specs or [parse_spec(DEFAULT_DATASET)]


def _read_spec_list(path: str) -> list:
    if not Path(path).is_file():
        raise UsageError(f"dataset list {path} not found; check the path")
    try:
        entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: expected a YAML list of datasets (strings or {{path, weight, schema, columns}})")
    return entries


# ---------------------------------------------------------------- local files


def local_files(path: str) -> list[Path] | None:
    """The data files a local spec names (a file, a folder of shards, or a glob); None for a hub name."""
    if not _is_local(path):
        return None
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UsageError(f"no files match {path}; check the pattern")
    elif p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and _data_suffix(f) in BUILDERS and not f.name.startswith(".")
        )
        if not files:
            raise UsageError(f"folder {path} holds no .json/.jsonl/.csv/.parquet/.txt files (optionally .gz)")
    elif p.is_file():
        files = [p]
    else:
        raise UsageError(f"data file {path} not found; check the path")
    kinds = {BUILDERS.get(_data_suffix(f)) for f in files}
    if None in kinds:
        bad = next(f for f in files if _data_suffix(f) not in BUILDERS)
        raise UsageError(
            f"unsupported data file type {_data_suffix(bad) or bad.name!r} for {bad}; use .json, .jsonl, .csv, "
            ".parquet or .txt (optionally .gz)"
        )
    if len(kinds) > 1:
        raise UsageError(f"{path} mixes file types {sorted(kinds)}; give each type as its own --dataset")
    for f in files:
        if f.stat().st_size == 0:
            raise UsageError(f"data file {f} is empty; give it at least one example")
    return files


def check_source(source) -> None:
    """Fail fast, before a model is loaded, on local data that is missing or empty (any spec form, or a list)."""
    if source is None or source == ():
        return
    for spec in expand_specs(list(source) if isinstance(source, (list, tuple)) else source):
        local_files(spec.path)


# ---------------------------------------------------------------- reading


def load_raw(spec: DatasetSpec):
    """The rows of one dataset as a `datasets.Dataset` (Arrow, cached by `datasets`)."""
    files = local_files(spec.path)
    ds = _read_hub(spec) if files is None else _read_local(files)
    if len(ds) == 0:
        raise UsageError(f"data {spec.name} has no examples")
    return ds


def load_records(source, split: str = "train") -> list[dict]:
    """All rows of one dataset as a list of dicts (small data: retention corpora, tests)."""
    spec = parse_spec(source)
    if split != "train" and spec.split == "train":
        spec = DatasetSpec(spec.path, spec.config, split, spec.weight, label=spec.label)
    return load_raw(spec).to_list()


def _read_local(files: list[Path]):
    import datasets

    builder = BUILDERS[_data_suffix(files[0])]
    if builder == "txt":
        return datasets.Dataset.from_list([r for f in files for r in _read_txt(f)])
    kwargs = {"field": _json_field(files[0])} if _data_suffix(files[0]) == ".json" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as err:
        if builder == "json":  # find the line the user must fix; or a column whose type changes between rows
            rows = [r for f in files for r in _python_rows(f)]
            try:
                return datasets.Dataset.from_list(rows)
            except Exception:
                pass
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{files[0]}: not a readable {builder} file ({msg[:200]})") from err


def _json_field(path: Path) -> str | None:
    """The wrapper key of a `{"data": [...]}` style .json file, else None (a list, or JSON lines)."""
    text = _text(path)
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None  # JSON lines in a .json file, or malformed (reported when read)
    return next((k for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), list)), None)


def _text(path: Path) -> str:
    import gzip

    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8") from err


def _python_rows(path: Path) -> list[dict]:
    """JSON rows read in Python, to name the exact line of a malformed file."""
    text = _text(path)
    if _data_suffix(path) == ".json" and not _looks_like_lines(text):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
        data = next((data[k] for k in WRAPPER_KEYS if isinstance(data, dict) and isinstance(data.get(k), list)), data)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UsageError(
                f'{path}: expected a JSON list of objects (or {{"data": [...]}}); for one object per line use .jsonl'
            )
        return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: malformed JSON on line {lineno}: {err.msg}; fix or remove that line") from err
        if not isinstance(obj, dict):
            raise UsageError(f"{path}: line {lineno} is not a JSON object")
        rows.append(obj)
    return rows


def _looks_like_lines(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) > 1 and all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in lines[:2])


def _read_txt(path: Path) -> list[dict]:
    """Plain text: blank-line separated paragraphs, each one `text` record."""
    return [{"text": c.strip()} for c in _text(path).split("\n\n") if c.strip()]


def _read_hub(spec: DatasetSpec):
    import datasets
    from huggingface_hub import constants

    try:
        return datasets.load_dataset(spec.path, spec.config, split=spec.split)
    except Exception as err:
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise UsageError(
                f"cannot load dataset {spec.path!r}: not a local file, not in the datasets cache, and the hub is "
                "offline "
                "(HF_HUB_OFFLINE=1); download it once online or pass a local .json/.jsonl/.csv/.parquet file"
            ) from err
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = spec.path + (f" (config {spec.config})" if spec.config else "") + f", split {spec.split!r}"
        raise UsageError(
            f"cannot load dataset {spec.path!r} ({where}): {msg[:200]}; check NAME:CONFIG:SPLIT, or pass a local file"
        ) from err
