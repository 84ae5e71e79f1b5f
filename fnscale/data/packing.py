"""Padding-free batches: examples packed into rows, and length-grouped batches as the cheap alternative.

`--packing` concatenates whole examples into rows of at most --max-seq-length tokens (best-fit decreasing,
deterministic), with `position_ids` restarting at 0 for every example and no `attention_mask`. Transformers
reads the restarts as example boundaries: SDPA and eager attention get a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), FlashAttention-2 runs varlen over one flattened row
(`_is_packed_sequence`, batch size 1, the `DataCollatorWithFlattening` layout). The first token of every
example has label -100, so nothing is predicted across a boundary: each example's loss terms are exactly
those of the unpacked batch, and the model's loss (mean over labelled tokens of the micro-batch) is the same
token-weighted mean.

Rows of one batch are right-padded with pad tokens at position 0 (each its own one-token segment, label
-100); no example has a single token (`truncate` drops those), so `batch_tokens` can tell padding apart.
"""

from __future__ import annotations

import bisect

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from fnscale.data.tokenize import IGNORE


def pack_rows(items: list[dict], max_len: int) -> list[dict]:
    """Whole examples packed into rows of at most max_len tokens (best-fit decreasing): {input_ids, labels, lengths,
    examples}."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    room: list[
        tuple[int, int]
    ] = []  # (free tokens, row index), sorted: the tightest row that fits is found by bisection
    rows: list[list[int]] = []
    for i in order:
        n = len(items[i]["input_ids"])
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, r = room.pop(at)
        else:
            free, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, r))
    return [_concat(items, row) for row in rows]


def _concat(items: list[dict], row: list[int]) -> dict:
    """One packed row; `examples` holds the indices of the items it packs, in order."""
    ids, labels = [], []
    for i in row:
        ids += items[i]["input_ids"]
        labels += [IGNORE, *items[i]["labels"][1:]]  # the first token is never predicted from the previous example
    return {"input_ids": ids, "labels": labels, "lengths": [len(items[i]["input_ids"]) for i in row], "examples": row}


def _positions(lengths: list[int]) -> list[int]:
    return [p for n in lengths for p in range(n)]


def collate_packed(rows: list[dict], pad_id: int, flatten: bool = False) -> dict:
    """{input_ids, labels, position_ids, use_cache} for packed rows; `flatten` joins them into one row (FlashAttention
    varlen)."""
    if flatten:
        rows = [
            {
                "input_ids": [t for r in rows for t in r["input_ids"]],
                "labels": [t for r in rows for t in r["labels"]],
                "lengths": [n for r in rows for n in r["lengths"]],
            }
        ]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # padding: one-token segments at position 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        positions[i, :n] = torch.tensor(_positions(r["lengths"]))
    # use_cache=False: with a KV cache (the config default, even in training) transformers skips the packed-sequence
    # check
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


def batch_tokens(batch: dict, as_tensor: bool = False):
    """Real (non-padding) tokens of a padded or a packed batch; `as_tensor`: a device tensor (no host sync)."""
    if "attention_mask" in batch:
        count = batch["attention_mask"].sum()
    else:
        pos = batch["position_ids"]
        nxt = torch.nn.functional.pad(pos[:, 1:], (0, 1), value=0)
        count = pos.numel() - ((pos == 0) & (nxt != 1)).sum()
    return count if as_tensor else int(count)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Transformers' length-grouped order (megabatches of 50 batches sorted by length), reseeded per epoch.

    Accelerate keeps a custom sampler and shards whole batches of it across processes; its `set_epoch`
    reaches this sampler, so each epoch has its own seeded order, the same on every process.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)
