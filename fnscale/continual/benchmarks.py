"""The standard continual-learning benchmarks of LLM papers (Zhang et al. 2015 data; orders of Progressive Prompts,
Razdaibiedina et al. 2023, used by O-LoRA and DOC): text classification answered with a label word.

`standard`: dbpedia, amazon, yahoo, ag_news (orders 1-3). `long`: those plus mnli, qqp, rte, sst2 (GLUE), boolq, cb,
copa, wic, multirc (SuperGLUE), imdb and yelp (orders 4-6). Each task: `train_size` (1000) training and `test_size`
(500) test examples drawn with a seed, a prompt naming the choices, the label word as the answer, label-word accuracy
by greedy generation. Data come from the hub (`datasets.load_dataset`) or, offline, from a local folder holding
NAME/train.jsonl and NAME/test.jsonl with the hub's columns. In a sequence file:

    benchmark: {name: standard, orders: [1, 2, 3], train_size: 1000, test_size: 500, local: raw/}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fnscale.errors import UsageError
from fnscale.runtime.atomic import write_text

YAHOO = [
    "Society & Culture",
    "Science & Mathematics",
    "Health",
    "Education & Reference",
    "Computers & Internet",
    "Sports",
    "Business & Finance",
    "Entertainment & Music",
    "Family & Relationships",
    "Politics & Government",
]
DBPEDIA = [
    "Company",
    "Educational Institution",
    "Artist",
    "Athlete",
    "Office Holder",
    "Mean Of Transportation",
    "Building",
    "Natural Place",
    "Village",
    "Animal",
    "Plant",
    "Album",
    "Film",
    "Written Work",
]
STARS = ["very negative", "negative", "neutral", "positive", "very positive"]


@dataclass(frozen=True)
class Bench:
    """One task: hub id (and config), split names, the prompt (a format string over the columns), the label column
    and its words (indexed by the label's integer value)."""

    hub: str
    config: str | None
    prompt: str
    labels: tuple[str, ...]
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"


def _ask(text: str, labels) -> str:
    return f"{text}\nChoose one of: {', '.join(labels)}.\nAnswer:"


TASKS = {
    "dbpedia": Bench(
        "fancyzhx/dbpedia_14",
        None,
        _ask("What is the topic of this article? {title}. {content}", DBPEDIA),
        tuple(DBPEDIA),
    ),
    "amazon": Bench(
        "SetFit/amazon_reviews_multi_en",
        None,
        _ask("What is the sentiment of this review? {text}", STARS),
        tuple(STARS),
    ),
    "yelp": Bench(
        "Yelp/yelp_review_full", None, _ask("What is the sentiment of this review? {text}", STARS), tuple(STARS)
    ),
    "yahoo": Bench(
        "community-datasets/yahoo_answers_topics",
        None,
        _ask("What is the topic of this question? {question_title} {question_content} {best_answer}", YAHOO),
        tuple(YAHOO),
        "topic",
    ),
    "ag_news": Bench(
        "fancyzhx/ag_news",
        None,
        _ask("What is the topic of this news? {text}", ["World", "Sports", "Business", "Science"]),
        ("World", "Sports", "Business", "Science"),
    ),
    "mnli": Bench(
        "nyu-mll/glue",
        "mnli",
        _ask(
            "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?",
            ["entailment", "neutral", "contradiction"],
        ),
        ("entailment", "neutral", "contradiction"),
        test_split="validation_matched",
    ),
    "qqp": Bench(
        "nyu-mll/glue",
        "qqp",
        _ask("Question 1: {question1}\nQuestion 2: {question2}\nDo they ask the same thing?", ["false", "true"]),
        ("false", "true"),
        test_split="validation",
    ),
    "rte": Bench(
        "nyu-mll/glue",
        "rte",
        _ask(
            "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDoes sentence 1 entail sentence 2?",
            ["entailment", "not_entailment"],
        ),
        ("entailment", "not_entailment"),
        test_split="validation",
    ),
    "sst2": Bench(
        "nyu-mll/glue",
        "sst2",
        _ask("What is the sentiment of this sentence? {sentence}", ["negative", "positive"]),
        ("negative", "positive"),
        test_split="validation",
    ),
    "boolq": Bench(
        "aps/super_glue",
        "boolq",
        _ask("{passage}\nQuestion: {question}?", ["false", "true"]),
        ("false", "true"),
        test_split="validation",
    ),
    "cb": Bench(
        "aps/super_glue",
        "cb",
        _ask(
            "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?",
            ["entailment", "contradiction", "neutral"],
        ),
        ("entailment", "contradiction", "neutral"),
        test_split="validation",
    ),
    "copa": Bench(
        "aps/super_glue",
        "copa",
        _ask(
            "Premise: {premise}\nWhat is the {question}? Option 1: {choice1} Option 2: {choice2}",
            ["Option 1", "Option 2"],
        ),
        ("Option 1", "Option 2"),
        test_split="validation",
    ),
    "wic": Bench(
        "aps/super_glue",
        "wic",
        _ask(
            "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nIs the word '{word}' used in the same sense?",
            ["false", "true"],
        ),
        ("false", "true"),
        test_split="validation",
    ),
    "multirc": Bench(
        "aps/super_glue",
        "multirc",
        _ask("{paragraph}\nQuestion: {question}\nCandidate answer: {answer}\nIs it correct?", ["false", "true"]),
        ("false", "true"),
        test_split="validation",
    ),
    "imdb": Bench(
        "stanfordnlp/imdb",
        None,
        _ask("What is the sentiment of this review? {text}", ["negative", "positive"]),
        ("negative", "positive"),
    ),
}

ORDERS = {
    1: ["dbpedia", "amazon", "yahoo", "ag_news"],
    2: ["dbpedia", "amazon", "ag_news", "yahoo"],
    3: ["yahoo", "amazon", "ag_news", "dbpedia"],
    4: [
        "mnli",
        "cb",
        "wic",
        "copa",
        "qqp",
        "boolq",
        "rte",
        "imdb",
        "yelp",
        "amazon",
        "sst2",
        "dbpedia",
        "ag_news",
        "multirc",
        "yahoo",
    ],
    5: [
        "multirc",
        "boolq",
        "wic",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst2",
        "dbpedia",
        "ag_news",
        "yelp",
        "amazon",
        "yahoo",
    ],
    6: [
        "yelp",
        "amazon",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst2",
        "dbpedia",
        "ag_news",
        "yahoo",
        "multirc",
        "boolq",
        "wic",
    ],
}
BENCHMARKS = {"standard": (1, 2, 3), "long": (4, 5, 6)}
SPEC_KEYS = {"name", "orders", "train_size", "test_size", "local", "seed", "max_chars"}


def records(name: str, split: str, local: str | Path | None) -> list[dict]:
    """Raw rows of one task split: NAME/SPLIT.jsonl under `local`, else the hub."""
    b = TASKS[name]
    hub_split = b.train_split if split == "train" else b.test_split
    if local:
        path = Path(local) / name / f"{split}.jsonl"
        if not path.is_file():
            raise UsageError(
                f"benchmark data {path} not found; give NAME/train.jsonl and NAME/test.jsonl with the hub's columns"
            )
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from datasets import load_dataset

    try:
        return list(load_dataset(b.hub, b.config, split=hub_split))
    except Exception as err:  # offline, moved, or renamed on the hub
        raise UsageError(
            f"benchmark task {name}: cannot load {b.hub} ({type(err).__name__}); go online, or give `local:` files"
        ) from err


def example(name: str, row: dict, max_chars: int) -> dict | None:
    """A prompt/completion pair; rows whose label is missing (-1 in test splits) are skipped. Long texts are cut."""
    b = TASKS[name]
    label = row.get(b.label_column)
    if not isinstance(label, int) or not 0 <= label < len(b.labels):
        return None
    fields = {k: (str(v)[:max_chars] if isinstance(v, str) else v) for k, v in row.items()}
    return {"prompt": b.prompt.format(**fields), "completion": b.labels[label]}


def materialise(spec: dict, folder: Path, out: Path | None) -> tuple[list[dict], list[list[str]]]:
    """Write NAME_train.jsonl / NAME_test.jsonl for the benchmark's tasks into `out`; returns (tasks, orders)."""
    if not isinstance(spec, dict) or spec.get("name") not in BENCHMARKS:
        raise UsageError(f"benchmark must be {{name: {' | '.join(BENCHMARKS)}, orders: [...]}}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UsageError(f"benchmark: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    orders = [int(o) for o in spec.get("orders", BENCHMARKS[spec["name"]])]
    if not set(orders) <= set(BENCHMARKS[spec["name"]]):
        raise UsageError(f"benchmark {spec['name']} has orders {list(BENCHMARKS[spec['name']])}; got {orders}")
    local = spec.get("local")
    local = (folder / local) if local and not Path(local).is_absolute() else local
    sizes = {"train": int(spec.get("train_size", 1000)), "test": int(spec.get("test_size", 500))}
    seed, max_chars = int(spec.get("seed", 0)), int(spec.get("max_chars", 1000))
    names = list(dict.fromkeys(t for o in orders for t in ORDERS[o]))
    tasks = []
    for name in names:
        paths = {s: (out or Path()) / f"{name}_{s}.jsonl" for s in sizes}  # out None: only listing, nothing written
        for split, n in sizes.items():
            if out is not None and not paths[split].is_file():
                rows = [e for e in (example(name, r, max_chars) for r in records(name, split, local)) if e is not None]
                rows = random.Random(seed).sample(rows, min(n, len(rows)))
                write_text(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tokens = max(len(w.split()) for w in TASKS[name].labels) * 4 + 4
        tasks.append(
            {
                "name": name,
                "train": str(paths["train"]),
                "eval": str(paths["test"]),
                "metric": "label_accuracy",
                "max_new_tokens": tokens,
            }
        )
    return tasks, [ORDERS[o] for o in orders]
