"""Build the CPU continual-learning pack from iso-codes as Debian ships it (package `iso-codes`, LGPL-2.1+).

    apt-get install iso-codes          # or: apt-get download iso-codes && dpkg -x iso-codes_*.deb iso
    python examples/continual/make_data.py --iso-dir /usr/share/iso-codes/json   # (or iso/usr/share/iso-codes/json)

Four short-answer tasks of different kinds, each a train and a test file (prompt/completion JSONL) in data/:
  country_code        a country's ISO 3166-1 alpha-3 code (a code from a name)            "Aruba" -> "ABW"
  region_country      the country of an ISO 3166-2 subdivision code (a name from a code)  "AD-02" -> "Andorra"
  language_code       a language's ISO 639-3 code (lower-case code from a name)           "Ghotuo" -> "aaa"
  region_type         the kind of an ISO 3166-2 subdivision (one of 8 label words)        "Canillo, Andorra" -> "Parish"
Test items are held out (never in training), so a score measures what generalises: code patterns, the country
prefix of subdivision codes, which countries use which kind of subdivision. Seeded, so the same package version
gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_TEST = 400, 50


def load(iso: Path, standard: str) -> list[dict]:
    return json.loads((iso / f"iso_{standard}.json").read_text(encoding="utf-8"))[standard]


def country_name(c: dict) -> str:
    return c.get("common_name") or c["name"]


def tasks(iso: Path) -> dict[str, list[dict]]:
    countries = load(iso, "3166-1")
    by_alpha2 = {c["alpha_2"]: country_name(c) for c in countries}
    regions = [r for r in load(iso, "3166-2") if r["code"][:2] in by_alpha2 and "," not in r["name"]]
    languages = [
        lang
        for lang in load(iso, "639-3")
        if lang.get("type") == "L" and lang.get("scope") == "I" and "(" not in lang["name"]
    ]
    kinds = [k for k, _ in Counter(r["type"] for r in regions).most_common(8)]
    return {
        "country_code": [
            {
                "prompt": f"What is the ISO 3166-1 alpha-3 code of {country_name(c)}? Answer with the code.",
                "completion": c["alpha_3"],
            }
            for c in countries
        ],
        "region_country": [
            {
                "prompt": f"Which country has the ISO 3166-2 subdivision code {r['code']}? Answer with the country.",
                "completion": by_alpha2[r["code"][:2]],
            }
            for r in regions
        ],
        "language_code": [
            {
                "prompt": f"What is the ISO 639-3 code of the {lang['name']} language? Answer with the code.",
                "completion": lang["alpha_3"],
            }
            for lang in languages
        ],
        "region_type": [
            {
                "prompt": f"What kind of subdivision is {r['name']} in {by_alpha2[r['code'][:2]]}? Answer with one of: "
                f"{', '.join(kinds)}.",
                "completion": r["type"],
            }
            for r in regions
            if r["type"] in kinds
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--iso-dir", default="/usr/share/iso-codes/json", help="folder holding iso_3166-1.json, iso_639-3.json, ..."
    )
    ap.add_argument("--out", default=str(HERE / "data"), help="where to write the files")
    args = ap.parse_args()
    iso, out = Path(args.iso_dir), Path(args.out)
    if not (iso / "iso_3166-1.json").is_file():
        raise SystemExit(f"error: no iso_3166-1.json in {iso}; install the Debian package iso-codes or pass --iso-dir")
    out.mkdir(parents=True, exist_ok=True)
    for k, (name, rows) in enumerate(tasks(iso).items()):
        rows = random.Random(k).sample(rows, len(rows))
        test, train = rows[:N_TEST], rows[N_TEST : N_TEST + N_TRAIN]
        for split, part in (("train", train), ("test", test)):
            (out / f"{name}_{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8"
            )
        print(f"{name}: {len(train)} train, {len(test)} test (of {len(rows)})")


if __name__ == "__main__":
    main()
