"""Regenerate the forgetting benchmark's data files from WordNet 3.0 as Debian ships it (package `wordnet-base`).

    apt-get install wordnet-base          # or: apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn
    python examples/forgetting/make_data.py --wordnet-dir /usr/share/wordnet   # (or wn/usr/share/wordnet)

Writes, next to this script:
  task_train.jsonl / task_val.jsonl  the SFT task, short answers: name the English noun that WordNet defines
                                     (prompt "Which English noun means: GLOSS? Answer with one word.",
                                     response: the noun, a word whose most frequent sense has that gloss);
  retention.txt                      held-out general English: the usage example sentences WordNet gives for
                                     verbs, adjectives and adverbs (never nouns, so no task text leaks in),
                                     grouped into paragraphs of a few sentences.
The choice is seeded, so the same WordNet files give byte-identical outputs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_VAL = 600, 64
N_RETENTION_SENTENCES = 240
SENTENCES_PER_PARAGRAPH = 8


def read_synsets(path: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """offset -> (lemmas, definition, example sentences) from a WordNet `data.POS` file."""
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        n_words = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i] for i in range(n_words)]
        examples = re.findall(r'"([^"]+)"', gloss)
        definition = gloss.split('; "')[0].strip().rstrip(";").strip()
        out[parts[0]] = (lemmas, definition, examples)
    return out


def first_senses(index_path: Path) -> dict[str, str]:
    """lemma -> offset of its most frequent sense, from a WordNet `index.POS` file."""
    out = {}
    for line in index_path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        parts = line.split()
        out[parts[0]] = parts[-int(parts[2])]  # synset offsets close the line, most frequent sense first
    return out


def task_rows(wn: Path, rng: random.Random) -> list[dict]:
    synsets = read_synsets(wn / "data.noun")
    rows = []
    for lemma, offset in sorted(first_senses(wn / "index.noun").items()):
        definition = synsets[offset][1]
        if lemma.isalpha() and 4 <= len(lemma) <= 12 and 6 <= len(definition.split()) <= 22 and lemma not in definition:
            rows.append(
                {"prompt": f"Which English noun means: {definition}? Answer with one word.", "completion": lemma}
            )
    return rng.sample(rows, N_TRAIN + N_VAL)


def retention_paragraphs(wn: Path, rng: random.Random) -> list[str]:
    sentences = []
    for pos in ("verb", "adj", "adv"):
        for _, _, examples in read_synsets(wn / f"data.{pos}").values():
            sentences += [e.strip() for e in examples if len(e.split()) >= 6]
    chosen = [
        s[0].upper() + s[1:] + ("" if s[-1] in ".!?" else ".")
        for s in rng.sample(sorted(set(sentences)), N_RETENTION_SENTENCES)
    ]
    return [" ".join(chosen[i : i + SENTENCES_PER_PARAGRAPH]) for i in range(0, len(chosen), SENTENCES_PER_PARAGRAPH)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--wordnet-dir", default="/usr/share/wordnet", help="folder holding data.noun, index.noun, data.verb, ..."
    )
    ap.add_argument("--out", default=str(HERE), help="where to write the files")
    args = ap.parse_args()
    wn, out = Path(args.wordnet_dir), Path(args.out)
    if not (wn / "data.noun").is_file():
        raise SystemExit(
            f"error: no WordNet data.noun in {wn}; install the Debian package wordnet-base or pass --wordnet-dir"
        )
    rows = task_rows(wn, random.Random(0))
    write_jsonl(out / "task_train.jsonl", rows[:N_TRAIN])
    write_jsonl(out / "task_val.jsonl", rows[N_TRAIN:])
    (out / "retention.txt").write_text("\n\n".join(retention_paragraphs(wn, random.Random(1))) + "\n", encoding="utf-8")
    print(f"wrote {N_TRAIN} + {N_VAL} task examples and {N_RETENTION_SENTENCES} retention sentences to {out}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
