"""Zero-shot accuracy under lm-evaluation-harness's conventions (lm_eval 0.4, HF backend), over
local files: LAMBADA (last word), multiple choice (ARC's {query, choices, gold}) and PIQA (its
original valid.jsonl + valid-labels.lst).

What lm-eval does, and so what this does:
- A request is (context, continuation). Trailing spaces of the context move to the
  continuation; context tokens = encode(context), continuation tokens = encode(context +
  continuation) minus that many leading tokens. `encode` adds the special tokens the tokenizer
  adds by default (a Llama tokenizer's BOS, none for GPT-2-style ones) unless `add_bos_token` says
  otherwise; a string that already starts with the BOS text gets none.
- The model reads (context + continuation)[-(max_length + 1):][:-1]; the log-probabilities of the
  continuation tokens are summed (`loglik`), and `greedy` is true when each is the argmax.
- Multiple choice: continuation = target_delimiter + choice; acc = argmax loglik is gold;
  acc_norm = argmax loglik / len(choice) in characters (the delimiter not counted) is gold.
- LAMBADA: context = the text before its last space, continuation = " " + last word;
  acc = greedy, perplexity = exp(-mean loglik).
"""
from __future__ import annotations

import hashlib
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from dsc import hf
from dsc.config import Config
from dsc.data.sources import resolve_file
from dsc.errors import FieldError


class TaskBase(Config):
    path: str = Field(description="JSONL file (relative paths start at the recipe's folder)")
    limit: int | None = Field(None, gt=0, description="score only the first N items (lm-eval's --limit)")
    batch_size: int = Field(8, gt=0, description="continuations per forward pass (results do not depend on it)")
    add_bos_token: bool | None = Field(None, description="null: special tokens as the tokenizer adds them by default "
                                                         "(lm-eval's default); true: start every input with BOS; "
                                                         "false: add no special tokens")

    def files(self) -> dict[str, str]:
        """Files this task reads (field → path), checked when the recipe is validated."""
        return {"path": self.path}


class LambadaTask(TaskBase):
    """{"text": ...} per line: predict the last word (lm-eval's lambada_openai)."""

    type: Literal["lambada"] = "lambada"


class _Choices(TaskBase):
    template: str = Field(description="prompt built from the item's keys with str.format")
    target_delimiter: str = Field(" ", description="put between the prompt and each choice (lm-eval's default)")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a format string ({exc}); write literal braces as {{{{ }}}}") from None
        if not fields:
            raise ValueError("names no field of the item, e.g. '{query}'")
        return v


class MultipleChoiceTask(_Choices):
    """{"query", "choices", "gold"} per line (lm-eval's arc_easy / arc_challenge)."""

    type: Literal["multiple_choice"] = "multiple_choice"
    template: str = Field("{query}\nAnswer:", description="prompt built from the item's keys (lm-eval's arc_easy "
                          "is 'Question: {question}\\nAnswer:'; `query` holds 'Question: ...')")


class PiqaTask(_Choices):
    """PIQA's own files: {"goal", "sol1", "sol2"} per line, the gold 0/1 per line of a labels file."""

    type: Literal["piqa"] = "piqa"
    labels: str | None = Field(None, description="labels file, one 0/1 per line "
                                                  "(default: <stem>-labels.lst beside path)")
    template: str = Field("Question: {goal}\nAnswer:", description="prompt built from the item's keys "
                                                                   "(lm-eval's piqa)")

    def labels_path(self) -> str:
        if self.labels is not None:
            return self.labels
        return str(Path(self.path).with_name(Path(self.path).stem + "-labels.lst"))

    def files(self) -> dict[str, str]:
        return {"path": self.path, "labels": self.labels_path()}


Task = Union[LambadaTask, MultipleChoiceTask, PiqaTask]
TASK_CLASSES = {"lambada": LambadaTask, "multiple_choice": MultipleChoiceTask, "piqa": PiqaTask}


@dataclass(frozen=True)
class Item:
    context: str
    continuations: tuple[str, ...]  # what is scored: delimiter + choice (LAMBADA: " " + last word)
    choices: tuple[str, ...]  # what acc_norm divides by (in characters)
    gold: int
    where: str  # file:line, for errors


def _read(path: Path, field: str) -> bytes:
    if not path.is_file():
        raise FieldError(field, f"file not found: {path}")
    return path.read_bytes()


def _rows(lines: list[str], path: Path, field: str, limit: int | None):
    """(line number, JSON object) of the first `limit` non-empty lines."""
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and n >= limit:
            return
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"{path.name}:{lineno} is not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise FieldError(field, f"{path.name}:{lineno} is not a JSON object")
        n += 1
        yield lineno, row


def _get(row: dict, key: str, kind, where: str, field: str, hint: str):
    if key not in row or not isinstance(row[key], kind) or isinstance(row[key], bool) and kind is int:
        raise FieldError(field, f"{where}: needs {key!r} ({getattr(kind, '__name__', kind)}); a line is {hint}")
    return row[key]


def _prompt(template: str, row: dict, where: str, field: str) -> str:
    try:
        return template.format_map(row)
    except (KeyError, IndexError) as exc:
        raise FieldError(field, f"names {exc} which {where} lacks (keys: {', '.join(sorted(row))})") from None


def _choice_item(context: str, choices: list, gold: int, delim: str, where: str, field: str) -> Item:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise FieldError(field, f"{where}: choices must be non-empty strings, got {choices!r}")
    if not 0 <= gold < len(choices):
        raise FieldError(field, f"{where}: gold {gold} is out of range for {len(choices)} choices (0-based)")
    return Item(context, tuple(delim + c for c in choices), tuple(choices), gold, where)


def load_items(task: Task, base_dir: Path, field: str = "") -> tuple[list[Item], dict]:
    """The task's first `limit` items, and what identifies the files (names, sha256)."""
    pre = f"{field}." if field else ""
    path = resolve_file(task.path, base_dir)
    data = _read(path, pre + "path")
    lines = data.decode("utf-8").splitlines()
    facts = {"path": path.name, "sha256": hashlib.sha256(data).hexdigest()[:16],
             "file_items": sum(1 for line in lines if line.strip())}
    rows = _rows(lines, path, pre + "path", task.limit)
    if isinstance(task, LambadaTask):
        items = [_lambada_item(row, f"{path.name}:{lineno}", pre) for lineno, row in rows]
    elif isinstance(task, MultipleChoiceTask):
        items = [_mc_item(task, row, f"{path.name}:{lineno}", pre) for lineno, row in rows]
    else:
        labels, more = _piqa_labels(task, base_dir, facts["file_items"], pre)
        facts.update(more)
        items = [_piqa_item(task, row, labels, lineno, f"{path.name}:{lineno}", pre) for lineno, row in rows]
    if not items:
        raise FieldError(pre + "path", f"{path.name} has no items")
    return items, facts


def _lambada_item(row: dict, where: str, pre: str) -> Item:
    text = _get(row, "text", str, where, pre + "path", '{"text": ...}')
    context, _, last = text.rpartition(" ")  # lm-eval: " ".join(text.split(" ")[:-1]), " " + last word
    if not last:
        raise FieldError(pre + "path", f"{where}: the text ends with a space: no last word")
    return Item(context, (" " + last,), (last,), 0, where)


def _mc_item(task: MultipleChoiceTask, row: dict, where: str, pre: str) -> Item:
    hint = '{"query": ..., "choices": [...], "gold": N}'
    choices = _get(row, "choices", list, where, pre + "path", hint)
    gold = _get(row, "gold", int, where, pre + "path", hint)
    context = _prompt(task.template, row, where, pre + "template")
    return _choice_item(context, choices, gold, task.target_delimiter, where, pre + "path")


def _piqa_labels(task: PiqaTask, base_dir: Path, n_items: int, pre: str) -> tuple[list[str], dict]:
    """The labels file's lines (aligned with the items' lines), and its name and sha256."""
    path = resolve_file(task.labels_path(), base_dir)
    if not path.is_file() and task.labels is None:
        raise FieldError(pre + "labels", f"file not found: {path} (the default, <stem>-labels.lst beside path): "
                         "set `labels` to PIQA's labels file")
    raw = _read(path, pre + "labels")
    labels = [line.strip() for line in raw.decode("utf-8").splitlines()]
    if sum(1 for x in labels if x) != n_items:
        raise FieldError(pre + "labels", f"{path.name} has {sum(1 for x in labels if x)} labels for {n_items} items: "
                         "is it the labels file of that split?")
    return labels, {"labels": path.name, "labels_sha256": hashlib.sha256(raw).hexdigest()[:16]}


def _piqa_item(task: PiqaTask, row: dict, labels: list[str], lineno: int, where: str, pre: str) -> Item:
    if lineno > len(labels) or labels[lineno - 1] not in ("0", "1"):
        got = repr(labels[lineno - 1]) if lineno <= len(labels) else "no line"
        raise FieldError(pre + "labels", f"{Path(task.labels_path()).name}:{lineno} must be 0 or 1 (the label of "
                         f"{where}), got {got}")
    sols = [_get(row, k, str, where, pre + "path", '{"goal": ..., "sol1": ..., "sol2": ...}') for k in ("sol1", "sol2")]
    context = _prompt(task.template, row, where, pre + "template")
    return _choice_item(context, sols, int(labels[lineno - 1]), task.target_delimiter, where, pre + "path")


# ---- tokenization (lm-eval's HFLM.tok_encode / _encode_pair) ------------------------------------

def _encode(tokenizer, texts: list[str], add_bos: bool | None) -> list[list[int]]:
    """Token ids of each text as lm-eval encodes it; one batched tokenizer call per kind."""
    bos = tokenizer.bos_token
    out: list[list[int] | None] = [None] * len(texts)
    for special in (True, False):  # texts starting with the BOS text get no special tokens
        idx = [i for i, t in enumerate(texts) if bool(bos and t.startswith(bos)) != special]
        if not idx:
            continue
        kwargs = {"add_special_tokens": False} if not special else \
            ({} if add_bos is None else {"add_special_tokens": add_bos})
        ids = tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]
        for i, row in zip(idx, ids):
            if special and add_bos and tokenizer.bos_token_id is not None and row[:1] != [tokenizer.bos_token_id]:
                row = [tokenizer.bos_token_id] + list(row)
            out[i] = list(row)
    return out


def encode_requests(tokenizer, pairs: list[tuple[str, str]], add_bos: bool | None) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation) pair."""
    moved = []
    for context, cont in pairs:
        n = len(context) - len(context.rstrip())
        moved.append((context[:-n], context[-n:] + cont) if n else (context, cont))
    full = [(i, c, k) for i, (c, k) in enumerate(moved) if c]
    wholes = _encode(tokenizer, [c + k for _, c, k in full], add_bos)
    contexts = _encode(tokenizer, [c for _, c, _ in full], add_bos)
    out: list = [None] * len(pairs)
    for (i, _, _), whole, ctx in zip(full, wholes, contexts):
        out[i] = (ctx, whole[len(ctx):])
    empty = [(i, k) for i, (c, k) in enumerate(moved) if not c]
    if empty:  # no context: lm-eval conditions on the BOS (else EOS) token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        for (i, _), ids in zip(empty, _encode(tokenizer, [k for _, k in empty], False)):
            out[i] = ([prefix], ids) if ids[:1] != [prefix] else (ids[:1], ids[1:])
    return out


# ---- scoring ------------------------------------------------------------------------------------

def max_length(model) -> int:
    """lm-eval's resolve_max_length: the config's n_positions / max_position_embeddings / n_ctx, else 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    return 2048


@torch.inference_mode()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(summed log-prob of the continuation, every continuation token is the argmax) per request,
    as lm-eval computes them, in batches of about `batch_size` continuations.

    Requests sharing a context longer than their continuations (an item's choices) run it once:
    its KV cache is repeated for each continuation. The others (LAMBADA, PIQA; inputs cut at
    max_length) run whole,
    sorted and right-padded: no attention mask needed, as causal attention never looks at the
    padding after a row. Only positions that predict a continuation token get logits, so the
    (B, T, V) tensor over a 49k-token vocabulary is never built. Results equal one request at a
    time to float rounding."""
    limit = max_length(model)
    keep = hf.supports_logits_to_keep(model)
    by_context: dict[tuple, list[int]] = {}
    if shares_contexts(model):
        for i, (ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) <= limit + 1:  # not truncated: the context is a true prefix
                by_context.setdefault(tuple(ctx), []).append(i)
    # Sharing saves (n - 1) contexts but pads the continuations to the longest: worth it where the
    # context is the longer part (ARC: ~26 vs ~5 tokens), not for PIQA's long solutions.
    groups = [g for g in by_context.values()
              if len(g) > 1 and len(requests[g[0]][0]) > max(len(requests[i][1]) for i in g)]
    groups.sort(key=lambda g: (len(requests[g[0]][0]), max(len(requests[i][1]) for i in g)))
    shared = {i for g in groups for i in g}
    inputs = {i: (ctx + cont)[-(limit + 1):][:-1] for i, (ctx, cont) in enumerate(requests) if i not in shared}
    # Latest first scored position first: a batch's rows then start scoring at about the same
    # position (few logits kept) and end about together (little padding).
    alone = sorted(inputs, key=lambda i: (-(len(inputs[i]) - len(requests[i][1])), -len(inputs[i])))
    results: list = [None] * len(requests)
    batches = [("shared", b) for b in _chunks(groups, requests, batch_size)] + \
              [("alone", alone[k:k + batch_size]) for k in range(0, len(alone), batch_size)]
    done = 0
    for kind, batch in batches:
        if kind == "shared":
            _shared_batch(model, requests, batch, results)
            done += sum(len(g) for g in batch)
        else:
            _alone_batch(model, requests, inputs, batch, keep, results)
            done += len(batch)
        if progress:
            progress(done, len(requests))
    return results


def shares_contexts(model) -> bool:
    """Whether a shared context can run once for all its continuations: the forward must take a
    KV cache back and keep only the last position's logits."""
    return hf.supports_logits_to_keep(model) and hf.cache_argument(model) is not None


def _chunks(groups: list[list[int]], requests, size: int) -> list[list[list[int]]]:
    """Consecutive groups with contexts of one length (no padding inside the cache), holding
    about `size` continuations together (at least one group)."""
    out, cur = [], []
    for g in groups:
        if cur and (sum(map(len, cur)) + len(g) > size or len(requests[g[0]][0]) != len(requests[cur[0][0]][0])):
            out.append(cur)
            cur = []
        cur.append(g)
    return out + ([cur] if cur else [])


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # (B, T), right-padded
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    return ids.to(device)


def _sum_greedy(logprobs: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """logprobs (C, V): row t predicts cont[t]."""
    tgt = torch.tensor(cont, device=logprobs.device)
    return logprobs.gather(-1, tgt[:, None]).sum().item(), bool((logprobs.argmax(-1) == tgt).all())


def _alone_batch(model, requests, inputs: dict, rows: list[int], keep: bool, results: list) -> None:
    device = next(model.parameters()).device
    ids = _padded([inputs[i] for i in rows], device)  # (B, T)
    first = min(len(inputs[i]) - len(requests[i][1]) for i in rows)  # first position that predicts a target
    n = ids.shape[1] - first
    out = model(input_ids=ids, use_cache=False, **({"logits_to_keep": n} if keep else {}))
    logprobs = F.log_softmax(out.logits[:, -n:].float(), dim=-1)  # (B, n, V)
    for r, i in enumerate(rows):
        end = len(inputs[i]) - first
        results[i] = _sum_greedy(logprobs[r, end - len(requests[i][1]):end], requests[i][1])


def _shared_batch(model, requests, groups: list[list[int]], results: list) -> None:
    """Contexts of one length (G, Tc) run once; their cache is repeated per continuation, and the
    continuations (R, Tk), right-padded, run after it: positions and masks as in one sequence."""
    device = next(model.parameters()).device
    ctxs = torch.tensor([requests[g[0]][0] for g in groups], device=device)  # (G, Tc)
    out = model(input_ids=ctxs, use_cache=True, logits_to_keep=1)
    head = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (G, V): predicts each continuation's first token
    rows = [(g, i) for g, members in enumerate(groups) for i in members]
    tails = [requests[i][1][:-1] for _, i in rows]  # what follows the context in the input: cont minus its last
    if any(tails):
        cache = hf.output_cache(out)
        cache.batch_select_indices(torch.tensor([g for g, _ in rows], device=device))
        ids = _padded([t or [0] for t in tails], device)  # (R, Tk), right-padded
        logits = model(input_ids=ids, use_cache=True, **hf.cache_kwargs(model, cache)).logits
        tail = F.log_softmax(logits.float(), dim=-1)  # (R, Tk, V)
    for r, (g, i) in enumerate(rows):
        cont = requests[i][1]
        lp = head[g][None]  # (1, V)
        if len(cont) > 1:
            lp = torch.cat([lp, tail[r, :len(cont) - 1]])  # (C, V): row t predicts cont[t]
        results[i] = _sum_greedy(lp, cont)


def score_items(model, tokenizer, task: Task, items: list[Item], progress=None, field: str = "") -> list[dict]:
    """Per item: the log-likelihood and greediness of each continuation, the predictions."""
    pairs = [(it, c) for it in items for c in it.continuations]
    requests = encode_requests(tokenizer, [(it.context, c) for it, c in pairs], task.add_bos_token)
    limit = max_length(model)
    for (it, c), (_, cont) in zip(pairs, requests):
        if not cont or len(cont) > limit:
            raise FieldError(f"{field}.path" if field else "path", f"{it.where}: the continuation {c!r} encodes to "
                             f"{len(cont)} tokens (lm-eval needs 1 to max_length = {limit})")
    lls = loglikelihoods(model, requests, task.batch_size, progress)
    out, k = [], 0
    for it in items:
        res = lls[k:k + len(it.continuations)]
        k += len(it.continuations)
        ll = [r[0] for r in res]
        norm = [x / len(c) for x, c in zip(ll, it.choices)]
        out.append({"loglik": ll, "greedy": [r[1] for r in res], "gold": it.gold,
                    "pred": ll.index(max(ll)), "pred_norm": norm.index(max(norm))})  # first max, as np.argmax
    return out


def _stderr(values: list[float]) -> float | None:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def summarize(task: Task, scores: list[dict]) -> dict:
    if isinstance(task, LambadaTask):
        hits = [float(s["greedy"][0]) for s in scores]
        return {"acc": sum(hits) / len(hits), "acc_stderr": _stderr(hits), "acc_norm": None,
                "perplexity": math.exp(-sum(s["loglik"][0] for s in scores) / len(scores)), "items": len(scores)}
    acc = [float(s["pred"] == s["gold"]) for s in scores]
    norm = [float(s["pred_norm"] == s["gold"]) for s in scores]
    return {"acc": sum(acc) / len(acc), "acc_stderr": _stderr(acc), "acc_norm": sum(norm) / len(norm),
            "acc_norm_stderr": _stderr(norm), "items": len(scores)}


def protocol(task: Task, tokenizer, facts: dict, items: list[Item]) -> dict:
    """Everything that fixes the numbers, recorded next to them."""
    probe = _encode(tokenizer, ["a"], task.add_bos_token)[0]
    out = {"type": task.type, **facts, "limit": task.limit, "items": len(items),
           "add_bos_token": task.add_bos_token,
           "bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
           "conventions": "lm-eval 0.4 HF loglikelihood"}
    if not isinstance(task, LambadaTask):
        out.update(template=task.template, target_delimiter=task.target_delimiter,
                   acc_norm="loglik / len(choice) chars")
    return out


def evaluate_task(model, tokenizer, task: Task, base_dir: Path = Path("."), field: str = "",
                  progress=None) -> dict:
    """acc (acc_norm, LAMBADA's perplexity), stderr, item count and protocol of one task."""
    items, facts = load_items(task, base_dir, field)
    scores = score_items(model, tokenizer, task, items, progress, field)
    return {**summarize(task, scores), "protocol": protocol(task, tokenizer, facts, items)}
