"""SFT data: file and hub loading, schema detection, prompt templates, loss masks, splits, collation.

Every example becomes (prompt messages, response). Labels are -100 on prompt tokens and padding,
so only the response and its EOS are trained; `text` data trains on every token.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fnscale.errors import UsageError

IGNORE = -100
SCHEMAS = ("auto", "alpaca", "prompt-completion", "qa", "chat", "text")
# Columns that identify each schema, in detection order.
SCHEMA_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "qa": ("question", "answer"),
    "text": ("text",),
}
ACCEPTED = "messages | instruction/input/output | prompt/completion | question/answer | text"
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
DEFAULT_DATASET = "default"


def default_dataset_path() -> Path:
    return Path(__file__).parent / "sample_data" / "default_sft.jsonl"


def default_retention_path() -> Path:
    return Path(__file__).parent / "sample_data" / "retention.txt"


# ---------------------------------------------------------------- loading


def _local_path(source: str) -> Path | None:
    """The local file `source` names (existing, or with a data suffix), else None (a hub dataset name)."""
    path = Path(source).expanduser()
    return path if path.exists() or path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet", ".txt") else None


def check_source(source: str | None) -> None:
    """Fail fast, before a model is loaded, on a local data file that is missing or empty."""
    path = _local_path(source) if source and source != DEFAULT_DATASET else None
    if path is not None and not path.is_file():
        raise UsageError(f"data file {source} not found; check the path")
    if path is not None and path.stat().st_size == 0:
        raise UsageError(f"data file {source} is empty; give it at least one example")


def load_records(source: str, split: str = "train") -> list[dict]:
    """Read a local .json/.jsonl/.csv/.parquet/.txt file, or a hub dataset by name, into a list of dicts."""
    if not source or source == DEFAULT_DATASET:
        source = str(default_dataset_path())
    path = _local_path(source)
    if path is not None:
        check_source(source)
        suffix = path.suffix.lower()
        readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}
        if suffix not in readers:
            raise UsageError(f"unsupported data file type {suffix!r} for {source}; use .json, .jsonl, .csv, .parquet or .txt")
        records = readers[suffix](path)
    else:
        records = _read_hub(source, split)
    if not records:
        raise UsageError(f"data {source} has no examples")
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8") from err
    if isinstance(data, dict):
        for key in ("data", "train", "examples", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}); for one object per line use .jsonl")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}: malformed JSON on line {lineno}: {err.msg}; fix or remove that line") from err
            if not isinstance(obj, dict):
                raise UsageError(f"{path}: line {lineno} is not a JSON object")
            records.append(obj)
    return records


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [dict(row) for row in csv.DictReader(fh)]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:
        raise UsageError(f"{path}: not a readable parquet file ({type(err).__name__})") from err


def _read_txt(path: Path) -> list[dict]:
    """Plain text: blank-line separated paragraphs, each one `text` record."""
    chunks = [c.strip() for c in path.read_text(encoding="utf-8").split("\n\n")]
    return [{"text": c} for c in chunks if c]


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise UsageError(
            f"cannot load dataset {name!r}: not a local file and the hub is unreachable or has no such dataset ({type(err).__name__}); pass a local .json/.jsonl/.csv/.parquet file"
        ) from err
    return [dict(r) for r in ds]


# ---------------------------------------------------------------- schemas


@dataclass
class Example:
    """One training example: chat messages of the prompt, and the response (None prompt for `text`)."""

    prompt: list[dict] | None
    response: str


def detect_schema(columns, schema: str = "auto") -> str:
    columns = set(columns)
    if schema not in SCHEMAS:
        raise UsageError(f"unknown --schema {schema!r}; use one of {', '.join(SCHEMAS)}")
    if schema != "auto":
        need = SCHEMA_COLUMNS[schema]
        missing = [c for c in need if c not in columns]
        if missing:
            raise UsageError(f"--schema {schema} needs columns {list(need)}, data has {sorted(columns)}")
        return schema
    for name, need in SCHEMA_COLUMNS.items():
        if all(c in columns for c in need):
            return name
    raise UsageError(f"no usable columns: found {sorted(columns)}; expected one of {ACCEPTED} (or pass --prompt-column/--response-column)")


def to_examples(records: list[dict], schema: str = "auto", prompt_column: str | None = None, response_column: str | None = None) -> list[Example]:
    if prompt_column or response_column:
        if not (prompt_column and response_column):
            raise UsageError("pass both --prompt-column and --response-column")
        missing = [c for c in (prompt_column, response_column) if c not in records[0]]
        if missing:
            raise UsageError(f"columns {missing} not in data; found {sorted(records[0])}")
        return [Example([{"role": "user", "content": str(r[prompt_column])}], str(r[response_column])) for r in records]
    schema = detect_schema(records[0].keys(), schema)
    out = []
    for i, r in enumerate(records):
        try:
            out.append(_example(r, schema))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"example {i} does not fit schema {schema}: {err}") from err
    return out


def _example(r: dict, schema: str) -> Example:
    if schema == "chat":
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError("`messages` must be a list of {role, content} objects")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError("no assistant message after a prompt")
        return Example([{"role": m["role"], "content": str(m["content"])} for m in msgs[:last]], str(msgs[last]["content"]))
    if schema == "alpaca":
        prompt = str(r["instruction"])
        if r.get("input"):
            prompt = f"{prompt}\n\n{r['input']}"
        return Example([{"role": "user", "content": prompt}], str(r["output"]))
    if schema == "prompt-completion":
        return Example([{"role": "user", "content": str(r["prompt"])}], str(r["completion"]))
    if schema == "qa":
        return Example([{"role": "user", "content": str(r["question"])}], str(r["answer"]))
    return Example(None, str(r["text"]))


# ---------------------------------------------------------------- tokenisation


def render_prompt(tokenizer, messages: list[dict], template: str = "auto") -> str:
    """The prompt text up to where the response starts: the chat template when there is one."""
    if template not in ("auto", "chat", "plain"):
        raise UsageError(f"unknown --template {template!r}; use auto, chat or plain")
    use_chat = template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--template chat: this tokenizer has no chat template; use --template plain")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    text = PLAIN_TEMPLATE.format(prompt=prompt)
    return f"{system}\n\n{text}" if system else text


def _bos(tokenizer) -> list[int]:
    """A BOS token only where the tokenizer itself would add one (chat templates usually carry their own)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a").input_ids
    return [bos] if probe and probe[0] == bos else []


def tokenize_example(tokenizer, ex: Example, max_len: int, template: str = "auto") -> dict | None:
    """input_ids and labels (prompt masked, response + EOS trained); None if no response token fits."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.prompt is None:
        ids = (_bos(tokenizer) + tokenizer(ex.response, add_special_tokens=False).input_ids + eos)[:max_len]
        return {"input_ids": ids, "labels": list(ids)} if len(ids) > 1 else None
    prompt_text = render_prompt(tokenizer, ex.prompt, template)
    p = tokenizer(prompt_text, add_special_tokens=False).input_ids
    if not prompt_text.startswith(tokenizer.bos_token or "\0"):
        p = _bos(tokenizer) + p
    r = tokenizer(ex.response, add_special_tokens=False).input_ids + eos
    if len(p) + len(r) > max_len:
        # Keep the response: cut the prompt from the left, and the response's tail only if it alone is too long.
        r_keep = min(len(r), max_len - min(len(p), max_len // 2))
        p_keep = max_len - r_keep
        p = p[len(p) - p_keep :] if p_keep > 0 else []
        r = r[:r_keep]
    if not r or not p:
        return None
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def tokenize_all(tokenizer, examples: list[Example], max_len: int, template: str = "auto") -> list[dict]:
    if max_len < 4:
        raise UsageError(f"--max-seq-length {max_len} is too small; use at least 64")
    out = [t for t in (tokenize_example(tokenizer, ex, max_len, template) for ex in examples) if t is not None]
    if not out:
        raise UsageError(f"--max-seq-length {max_len} is too small to hold any response; raise it")
    return out


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split for data without one; fraction 0 keeps everything for training."""
    if not 0 <= fraction < 1:
        raise UsageError(f"--validation-split {fraction} must be in [0, 1)")
    if fraction == 0 or len(items) < 2:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(len(items) * fraction)))
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding has attention 0 and label -100."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@dataclass
class SFTData:
    train: list[dict]
    validation: list[dict]
    schema: str


def build_sft_data(tokenizer, source: str, max_len: int, schema: str = "auto", template: str = "auto", validation_split: float = 0.05, seed: int = 42, validation_source: str | None = None, prompt_column: str | None = None, response_column: str | None = None, max_samples: int | None = None) -> SFTData:
    """Load, convert, tokenise and split in one place, for training, templates and eval alike."""
    records = load_records(source)
    if max_samples:
        records = records[:max_samples]
    examples = to_examples(records, schema, prompt_column, response_column)
    used_schema = "custom" if prompt_column else detect_schema(records[0].keys(), schema)
    if validation_source:
        train_ex = examples
        val_ex = to_examples(load_records(validation_source), schema, prompt_column, response_column)
    else:
        train_ex, val_ex = split_validation(examples, validation_split, seed)
    train = tokenize_all(tokenizer, train_ex, max_len, template)
    val = [t for t in (tokenize_example(tokenizer, ex, max_len, template) for ex in val_ex) if t is not None]
    return SFTData(train, val, used_schema)
