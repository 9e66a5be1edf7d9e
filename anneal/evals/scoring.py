"""Forward-only benchmark scores: log-likelihoods of continuations given prompts.

Multiple choice: `acc` (the choice of highest log-likelihood is the gold one) and `acc_norm` (the
same after dividing each choice's log-likelihood by its length, as lm-evaluation-harness defines
it: `len(choice)` in characters, without the target delimiter) and `acc_bytes` (by its UTF-8
length, the harness's byte-normalised accuracy). Generative tasks: the
log-likelihood of the gold answer per UTF-8 byte (summed over items, divided by their bytes), the
cheap proxy of GSM8K / HumanEval that moves while a model trains.

Tokenization is lm-evaluation-harness's (`encode_pair`): no special tokens; trailing spaces of
the context move to the continuation; the continuation's tokens are those of `context +
continuation` after the context's; the input is left-truncated to the model's context length.

Under several ranks each rank scores every `world`-th item; all ranks run the same number of
forwards (expert parallelism exchanges tokens inside each one), and the per-task sums are
all-reduced once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anneal.evals.tasks import Task

_PAD_TO = 64  # sequence lengths are padded to a multiple of this: few distinct shapes to compile


@dataclass
class Request:
    task: int          # index into the task list
    item: int          # index into the task's items
    choice: int
    context: list[int]
    continuation: list[int]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def rank_items(tasks: list[Task], rank: int, world: int) -> list[tuple[int, int]]:
    """(task, item) pairs this rank scores: every `world`-th item over all tasks."""
    pairs = [(t, i) for t, task in enumerate(tasks) for i in range(len(task.items))]
    return pairs[rank::world]


def build_requests(tasks: list[Task], tokenizer, pairs: list[tuple[int, int]]) -> list[Request]:
    out = []
    for t, i in pairs:
        task = tasks[t]
        item = task.items[i]
        context = task.context(item)
        for c, cont in enumerate(task.continuations(item)):
            ctx, cont_ids = encode_pair(tokenizer, context, cont)
            out.append(Request(t, i, c, ctx, cont_ids))
    return out


@torch.no_grad()
def loglikelihoods(model, requests: list[Request], device: torch.device, max_len: int,
                   batch_tokens: int, n_batches: int | None = None) -> list[float]:
    """Sum of log p(continuation | context) per request (fp32 log-softmax). `n_batches`: run at
    least this many forwards (empty ones after the real ones), so every rank runs as many."""
    inputs = []
    for r in requests:
        whole = (r.context + r.continuation)[-(max_len + 1):]
        inputs.append((whole[:-1], len(r.continuation)))
    order = sorted(range(len(inputs)), key=lambda k: -len(inputs[k][0]))
    batches = plan_batches([len(inputs[k][0]) for k in order], batch_tokens)
    out = [0.0] * len(requests)
    start = 0
    for size in batches:
        idx = order[start:start + size]
        start += size
        width = _padded(len(inputs[idx[0]][0]))
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        for row, k in enumerate(idx):
            ids[row, :len(inputs[k][0])] = torch.tensor(inputs[k][0])
        hidden = model.hidden_states(ids.to(device))
        rows, cols, targets = [], [], []
        for row, k in enumerate(idx):
            tokens, n_cont = inputs[k]
            whole = tokens + [(requests[k].context + requests[k].continuation)[-1]]
            n_cont = min(n_cont, len(tokens))
            first = len(tokens) - n_cont
            rows += [row] * n_cont
            cols += range(first, len(tokens))
            targets += whole[first + 1:]
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logits = model.lm_head(picked).float()  # the head on the continuation positions only
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(idx), dtype=torch.float64, device=device)
        sums.index_add_(0, torch.tensor(rows, device=device), logp.double())
        for row, value in enumerate(sums.tolist()):  # one device read per batch
            out[idx[row]] = value
    for _ in range(len(batches), n_batches or 0):  # keep step with the ranks that have more batches
        model.hidden_states(torch.zeros(1, _PAD_TO, dtype=torch.long, device=device))
    return out


def _padded(n: int) -> int:
    return max(_PAD_TO, -(-n // _PAD_TO) * _PAD_TO)


def plan_batches(lengths_desc: list[int], batch_tokens: int) -> list[int]:
    """Batch sizes over requests sorted longest first: each batch's rows x padded width stays
    within `batch_tokens` (a longer single row still runs alone)."""
    sizes, i = [], 0
    while i < len(lengths_desc):
        width = _padded(lengths_desc[i])
        n = max(1, min(len(lengths_desc) - i, batch_tokens // width))
        sizes.append(n)
        i += n
    return sizes


# ---------------------------------------------------------------------------------- metrics
# per task, the sums all-reduced over ranks: multiple choice [items, acc, acc_norm, acc_bytes];
# generative [items, log-likelihood, bytes, tokens]
_N_SUMS = {"multiple_choice": 4, "generative": 4}


def task_sums(tasks: list[Task], requests: list[Request], lls: list[float]) -> torch.Tensor:
    """This rank's sums of every task, one float64 vector (the one all-reduce)."""
    offsets, n = [], 0
    for task in tasks:
        offsets.append(n)
        n += _N_SUMS[task.kind]
    sums = torch.zeros(n, dtype=torch.float64)
    by_item: dict[tuple[int, int], list[tuple[Request, float]]] = {}
    for r, ll in zip(requests, lls):
        by_item.setdefault((r.task, r.item), []).append((r, ll))
    for (t, i), scored in by_item.items():
        task, o = tasks[t], offsets[t]
        item = task.items[i]
        sums[o] += 1
        if task.kind == "multiple_choice":
            choices = task.choices_of(item)
            ll = [s for _, s in sorted(scored, key=lambda x: x[0].choice)]
            gold = task.gold_index(item)
            sums[o + 1] += float(_argmax(ll) == gold)
            sums[o + 2] += float(_argmax([v / len(c) for v, c in zip(ll, choices)]) == gold)
            sums[o + 3] += float(_argmax([v / len(c.encode("utf-8")) for v, c in zip(ll, choices)]) == gold)
        else:
            (r, ll), = scored
            sums[o + 1] += ll
            sums[o + 2] += len(task.continuations(item)[0].encode("utf-8"))
            sums[o + 3] += len(r.continuation)
    return sums


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # first of equals, as numpy.argmax


def metrics_from_sums(tasks: list[Task], sums: torch.Tensor, prefix: str = "bench/") -> dict:
    """`bench/<task>/acc`, `.../acc_norm`, `.../acc_bytes` (multiple choice); `.../logprob_per_byte`,
    `.../bits_per_byte`, `.../logprob_per_token` (generative); `.../items`."""
    out, o = {}, 0
    for task in tasks:
        s = [float(v) for v in sums[o:o + _N_SUMS[task.kind]]]
        o += _N_SUMS[task.kind]
        key = f"{prefix}{task.name}/"
        out[key + "items"] = int(s[0])
        if task.kind == "multiple_choice":
            out[key + "acc"] = s[1] / s[0]
            out[key + "acc_norm"] = s[2] / s[0]
            out[key + "acc_bytes"] = s[3] / s[0]
        else:
            out[key + "logprob_per_byte"] = s[1] / s[2]
            out[key + "bits_per_byte"] = -s[1] / s[2] / math.log(2)
            out[key + "logprob_per_token"] = s[1] / s[3]
    return out


def score_tasks(model, tasks: list[Task], tokenizer, device: torch.device, layout=None,
                batch_tokens: int = 8192, max_len: int | None = None, requests: list[Request] | None = None) -> dict:
    """Every task's metrics for `model` (put in eval mode by the caller); under a `layout` of
    several ranks each scores its share and the sums are all-reduced once."""
    rank, world = (layout.rank, layout.world) if layout is not None else (0, 1)
    if requests is None:
        requests = build_requests(tasks, tokenizer, rank_items(tasks, rank, world))
    max_len = max_len or model.config.max_position_embeddings
    n_batches = None
    if world > 1:
        mine = len(plan_batches(sorted((min(len(r.context) + len(r.continuation), max_len + 1) - 1
                                        for r in requests), reverse=True), batch_tokens))
        n_batches = max(layout.all_gather(mine))
    lls = loglikelihoods(model, requests, device, max_len, batch_tokens, n_batches)
    sums = task_sums(tasks, requests, lls).to(device)
    if layout is not None:
        layout.all_reduce_(sums)
    return metrics_from_sums(tasks, sums.cpu())
