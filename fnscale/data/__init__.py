"""SFT data as users bring it: sources (files, folders, globs, .gz, hub with config/split), shapes mapped to
chat messages, loss masks on every assistant turn, weighted seeded mixing, `datasets.map` caching.

Modules: `sources` (where data comes from), `schemas` (which columns mean what), `tokenize` (chat rendering,
label masks, cached map, collation), `mixing` (splits, weights, the run's SFTData), `preview` (`data show`).
"""

from fnscale.data.mixing import (
    DataOptions,
    SFTData,
    build_sft_data,
    sample_items,
    sample_token_ids,
    split_validation,
    weighted,
)
from fnscale.data.preview import preview
from fnscale.data.schemas import ACCEPTED, SCHEMAS, SHAPES, Example, detect_schema, to_examples
from fnscale.data.sources import (
    DEFAULT_DATASET,
    DatasetSpec,
    check_source,
    default_dataset_path,
    default_retention_path,
    expand_specs,
    load_raw,
    load_records,
    parse_spec,
)
from fnscale.data.tokenize import (
    IGNORE,
    NO_LIMIT,
    collate,
    encode,
    render_prompt,
    tokenize_all,
    tokenize_example,
    truncate,
)

__all__ = [
    "ACCEPTED",
    "DEFAULT_DATASET",
    "IGNORE",
    "NO_LIMIT",
    "SCHEMAS",
    "SHAPES",
    "DataOptions",
    "DatasetSpec",
    "Example",
    "SFTData",
    "build_sft_data",
    "check_source",
    "collate",
    "default_dataset_path",
    "default_retention_path",
    "detect_schema",
    "encode",
    "expand_specs",
    "load_raw",
    "load_records",
    "parse_spec",
    "preview",
    "render_prompt",
    "sample_items",
    "sample_token_ids",
    "split_validation",
    "to_examples",
    "tokenize_all",
    "tokenize_example",
    "truncate",
    "weighted",
]
