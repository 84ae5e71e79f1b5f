"""Token-level loss and retention scoring, shared by training (validation, retention probe) and `fnscale eval`.

All losses are token means (summed NLL over scored tokens / their count), so corpora of any length
compare, and per-rank sums add up exactly under Accelerate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fnscale import data
from fnscale.data.tokenize import encode_text
from fnscale.errors import UsageError

NO_LIMIT = 10**9  # a max_len that never truncates (chunking happens afterwards)

CL_CONVENTION = (
    "Lopez-Paz & Ranzato (2017), GEM: R[i][j] is the score on task j after training on tasks 1..i (row i = checkpoint "
    "i, "
    "in training order); b_j is the base model's score on task j (the paper uses a randomly initialised model; here "
    "the "
    "pre-trained base). With T tasks: ACC = (1/T) sum_j R[T][j]; BWT = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j]) "
    "(negative = forgetting); FWT = 1/(T-1) sum_{j>1} (R[j-1][j] - b_j) (positive = earlier tasks helped a later one "
    "before it was trained). BWT and FWT need T >= 2."
)


# ---------------------------------------------------------------- token-level loss


def batches(items: list[dict], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [data.collate(items[i : i + batch_size], pad_id) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def nll_sum(model, batch: dict[str, torch.Tensor], device) -> tuple[float, int]:
    """Summed next-token NLL over labelled positions, and their count (only scored positions hit the softmax)."""
    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != data.IGNORE
    if not keep.any():
        return 0.0, 0
    nll = torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum")
    return float(nll.double()), int(keep.sum())


def shard_sums(model, bs: list[dict], rank: int, world: int, device) -> tuple[float, int, int]:
    """This rank's share (batches rank, rank+world, ...) as (NLL sum, tokens, forward calls).

    Every rank makes the same number of forward calls (a short shard repeats batch 0 and discards
    it), because under ZeRO-3 each forward gathers parameters collectively and would hang otherwise.
    """
    calls = math.ceil(len(bs) / world)
    mine = bs[rank::world]
    total, count = 0.0, 0
    for i in range(calls):
        if i < len(mine):
            s, c = nll_sum(model, mine[i], device)
            total, count = total + s, count + c
        else:
            nll_sum(model, bs[0], device)
    return total, count, calls


def loss_stats(total: float, count: int) -> dict:
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": perplexity(loss), "tokens": count}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def corpus_loss(model, items: list[dict], batch_size: int, pad_id: int, device, bar=None) -> dict:
    """Mean NLL per scored token, its perplexity and the token count, on one process; `bar` (a tqdm bar, optional)
    advances by one per batch."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(items, batch_size, pad_id):
        s, c = nll_sum(model, batch, device)
        total, count = total + s, count + c
        if bar is not None:
            bar.update(1)
    model.train(was_training)
    return loss_stats(total, count)


def reduced_sums(model, bs: list[dict], accelerator, device) -> tuple[float, int]:
    """(NLL sum, tokens) over all of `bs`, each batch scored once by one rank (round-robin), summed over ranks."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    total, count, _ = shard_sums(model, bs, rank, world, device)
    if world > 1:
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        total, count = accelerator.reduce(sums, reduction="sum").tolist()
    return total, int(count)


def sharded_loss(model, bs: list[dict], accelerator) -> float:
    """Mean loss per scored token over `bs`, the same figure on any number of ranks (no even-batches padding:
    every sample counts once); the model is left in train mode."""
    model.eval()
    try:
        total, count = reduced_sums(model, bs, accelerator, accelerator.device)
    finally:
        model.train()
    return loss_stats(total, count)["loss"]


# ---------------------------------------------------------------- retention corpora


RETENTION_METRIC = "retention/2"  # /1 (before issue 20) rendered plain text as an example and scored an appended EOS
SCORED_TEXT = "text: its own tokens (BOS where the tokenizer adds one; no EOS or end-of-turn token; no chat template)"
SCORED_SFT = "SFT: every token of the training rendering (prompt, response, end-of-turn/EOS; chat template if any)"


@dataclass
class RetentionCorpus:
    """Windows to score and what they hold (`scored`: SCORED_TEXT, SCORED_SFT or both, for the reports)."""

    items: list[dict]
    scored: str


def retention_corpus(tokenizer, source: str, max_len: int, max_samples: int | None = None) -> RetentionCorpus:
    """Every token of the corpus scored, in non-overlapping windows of max_len (long texts are chunked, not cut).

    Plain text (.txt, `text` columns) is scored on its own tokens (`encode_text`): nothing a chat model
    learns about ending a turn moves the figure. SFT data is rendered as in training, prompt tokens scored too.
    """
    path = data.default_retention_path() if source in ("", "default") else source
    records = data.load_records(str(path))[: max_samples or None]
    items, kinds = [], set()
    for ex in data.to_examples(records):
        if ex.messages is None:
            ids = encode_text(tokenizer, ex.text)
        else:
            tok = data.tokenize_example(tokenizer, ex, NO_LIMIT)
            if tok is None:
                continue
            ids = tok["input_ids"]
        kinds.add(SCORED_TEXT if ex.messages is None else SCORED_SFT)
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 1:
                items.append({"input_ids": chunk, "labels": list(chunk)})
    if not items:
        raise UsageError(f"retention data {source} has no text to score")
    return RetentionCorpus(items, "; ".join(sorted(kinds, reverse=True)))


def retention_items(tokenizer, source: str, max_len: int, max_samples: int | None = None) -> list[dict]:
    """The windows of `retention_corpus`."""
    return retention_corpus(tokenizer, source, max_len, max_samples).items


def corpus_names(sources, default_name: str = "retention") -> list[str]:
    """Short unique names (file stems) for metric keys and tables."""
    names = []
    for s in sources:
        base = default_name if s in ("", "default") else re.sub(r"[^\w.-]+", "_", Path(s).stem or s)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


class RetentionProbe:
    """Perplexity on retention corpora during training, correct under DDP and ZeRO-3.

    Batches are dealt round-robin to ranks, sums are reduced, and all ranks make the same number
    of forward calls, so every rank returns the same figures.
    """

    def __init__(self, paths: tuple[str, ...], tokenizer, max_len: int, batch_size: int):
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        corpora = {name: retention_corpus(tokenizer, p, max_len) for name, p in zip(corpus_names(paths), paths)}
        self.batches = {name: batches(c.items, batch_size, pad) for name, c in corpora.items()}
        self.scored = {name: c.scored for name, c in corpora.items()}  # which tokens each figure covers

    def describe(self) -> dict:
        """For metrics.jsonl and summary.json: the metric's version and the tokens scored per corpus."""
        return {"retention_metric": RETENTION_METRIC, "retention_scored": dict(self.scored)}

    def measure(self, model, accelerator=None, prefix: str = "retention") -> dict[str, float]:
        """{prefix}_loss/<name> and {prefix}_ppl/<name> per corpus; the model's train/eval mode is restored."""
        device = accelerator.device if accelerator is not None else model_device(model)
        was_training = model.training
        model.eval()
        out = {}
        try:
            for name, bs in self.batches.items():
                stats = loss_stats(*reduced_sums(model, bs, accelerator, device))
                out[f"{prefix}_loss/{name}"] = stats["loss"]
                out[f"{prefix}_ppl/{name}"] = stats["ppl"]
        finally:
            model.train(was_training)
        return out


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------- continual learning


def cl_metrics(R, baseline) -> dict:
    """ACC, BWT and FWT of a T x T score matrix R (row i: after training on task i) and base scores b (length T)."""
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise UsageError(
            f"the continual-learning matrix must be square with at least one task; got {[len(r) for r in R]} x {T}"
        )
    if len(baseline) != T:
        raise UsageError(f"baseline has {len(baseline)} scores for {T} tasks")
    acc = sum(R[T - 1][j] for j in range(T)) / T
    bwt = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None
    fwt = sum(R[j - 1][j] - baseline[j] for j in range(1, T)) / (T - 1) if T > 1 else None
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "T": T}
