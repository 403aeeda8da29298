"""Zero-shot scoring (dsc.zeroshot) under lm-eval's conventions: file formats and their errors,
tokenization, batching == one request at a time == a spelled-out reference, acc / acc_norm /
perplexity by hand, a quality floor on trained weights, and the `evaluate` stage's `tasks`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS, make_model
from dsc import Context, TextSource, apply_stage
from dsc.errors import DscInputError
from dsc.recipe import validate
from dsc.stages.evaluate import EvaluateConfig
from dsc.zeroshot import (LambadaTask, MultipleChoiceTask, PiqaTask, _shared_batch, encode_requests, evaluate_task,
                          load_items, loglikelihoods, score_items)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


MC = [{"query": "Question: Which one?", "choices": ["a", "bbbb"], "gold": 1},
      {"query": "Question: And now?", "choices": ["a", "bbbb"], "gold": 0}]
PIQA = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
        {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"}]


# ---- formats ------------------------------------------------------------------------------------

def test_formats_build_lm_eval_requests(tmp_path):
    lam = jsonl(tmp_path / "lambada.jsonl", [{"text": "the cat sat on the mat"}, {"text": "one two"}])
    items, facts = load_items(LambadaTask(path=str(lam)), tmp_path)
    assert [(i.context, i.continuations, i.gold) for i in items] == [("the cat sat on the", (" mat",), 0),
                                                                      ("one", (" two",), 0)]
    assert facts["path"] == "lambada.jsonl" and len(facts["sha256"]) == 16

    mc = jsonl(tmp_path / "arc.jsonl", MC)
    items, _ = load_items(MultipleChoiceTask(path="arc.jsonl", limit=1), tmp_path)  # relative to base_dir
    assert len(items) == 1
    assert items[0].context == "Question: Which one?\nAnswer:"  # lm-eval's arc_easy prompt
    assert items[0].continuations == (" a", " bbbb") and items[0].choices == ("a", "bbbb") and items[0].gold == 1
    assert load_items(MultipleChoiceTask(path=str(mc), template="Q: {query}!"), tmp_path)[0][1].context == \
        "Q: Question: And now?!"

    jsonl(tmp_path / "valid.jsonl", PIQA)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    items, facts = load_items(PiqaTask(path="valid.jsonl"), tmp_path)  # labels: <stem>-labels.lst beside it
    assert items[0].context == "Question: Open a jar\nAnswer:"
    assert [i.gold for i in items] == [0, 1] and items[1].continuations == (" use water", " use a towel")
    assert facts["labels"] == "valid-labels.lst"
    (tmp_path / "other.lst").write_text("1\n1\n")
    assert [i.gold for i in load_items(PiqaTask(path="valid.jsonl", labels="other.lst"), tmp_path)[0]] == [1, 1]


BAD_FILES = [  # (task type, file lines, labels file or None, field named, words)
    ("multiple_choice", [MC[0], "{not json"], None, "t.path", "data.jsonl:2 is not JSON"),
    ("multiple_choice", [MC[0], [1, 2]], None, "t.path", "data.jsonl:2 is not a JSON object"),
    ("multiple_choice", [{"query": "q", "choices": ["a", "b"]}], None, "t.path", "data.jsonl:1: needs 'gold'"),
    ("multiple_choice", [{"query": "q", "choices": ["a", "b"], "gold": 2}], None, "t.path",
     "data.jsonl:1: gold 2 is out of range for 2 choices"),
    ("multiple_choice", [{"query": "q", "choices": ["a", ""], "gold": 0}], None, "t.path", "non-empty strings"),
    ("multiple_choice", [{"question": "q", "choices": ["a", "b"], "gold": 0}], None, "t.template",
     "names 'query' which data.jsonl:1 lacks"),
    ("lambada", [{"txt": "a b"}], None, "t.path", "data.jsonl:1: needs 'text'"),
    ("piqa", PIQA, None, "t.labels", "the default, <stem>-labels.lst beside path"),
    ("piqa", PIQA, "0\n2\n", "t.labels", "data-labels.lst:2 must be 0 or 1"),
    ("piqa", PIQA, "0\n", "t.labels", "data-labels.lst has 1 labels for 2 items"),
    ("piqa", PIQA, "0\n\n1\n", "t.labels", "data-labels.lst:2 must be 0 or 1 (the label of data.jsonl:2), got ''"),
]


@pytest.mark.parametrize("kind,lines,labels,field,words", BAD_FILES)
def test_bad_files_name_field_and_line(tmp_path, kind, lines, labels, field, words):
    jsonl(tmp_path / "data.jsonl", [json.dumps(x) if not isinstance(x, str) else x for x in lines])
    if labels is not None:
        (tmp_path / "data-labels.lst").write_text(labels)
    task = {"lambada": LambadaTask, "multiple_choice": MultipleChoiceTask, "piqa": PiqaTask}[kind](path="data.jsonl")
    with pytest.raises(DscInputError) as exc:
        load_items(task, tmp_path, "t")
    assert exc.value.path == field and words in exc.value.message


# ---- tokenization -------------------------------------------------------------------------------

def test_encode_pair_as_lm_eval(tokenizer):
    """Trailing spaces of the context move to the continuation; continuation = encode(whole)
    minus encode(context); BOS as the tokenizer adds it, or forced on / off."""
    pairs = [("The cat was ", "hungry"), ("The cat was", " hungry"), ("A small dog", " ran")]
    for (ctx, cont), (c_ids, k_ids) in zip(pairs, encode_requests(tokenizer, pairs, None)):
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
        whole, head = tokenizer.encode(ctx + cont), tokenizer.encode(ctx)
        assert (c_ids, k_ids) == (head, whole[len(head):]) and k_ids
    assert encode_requests(tokenizer, pairs[:1], None) == encode_requests(tokenizer, pairs[1:2], None)
    bos = tokenizer.bos_token_id
    on, off = encode_requests(tokenizer, pairs, True), encode_requests(tokenizer, pairs, False)
    assert all(c[0] == bos and c[1:] == o[0] and k == o[1] for (c, k), o in zip(on, off))
    (ctx, cont), = encode_requests(tokenizer, [("", "The cat")], None)  # no context: BOS conditions
    assert ctx == [bos] and cont == tokenizer.encode("The cat", add_special_tokens=False)


# ---- scoring ------------------------------------------------------------------------------------

def reference(model, ctx: list[int], cont: list[int], limit: int) -> tuple[float, bool]:
    """lm-eval's HFLM._loglikelihood_tokens for one request, spelled out: full logits, no batch."""
    inp = torch.tensor((ctx + cont)[-(limit + 1):][:-1])[None]  # (1, T)
    with torch.no_grad():
        lp = F.log_softmax(model(inp).logits[0, -len(cont):].float(), dim=-1)  # (C, V)
    tgt = torch.tensor(cont)
    return lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all())


def sliding_gemma2(vocab: int):
    """Sliding-window attention (window 4) and final logit soft-capping: what shortcuts break."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
        final_logit_softcapping=5.0)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_batched_equals_one_by_one_and_reference(tokenizer, family, monkeypatch):
    """Shared contexts, padding, sorting and logits_to_keep change nothing (to float rounding),
    also where the input is cut from the left at max_position_embeddings (256 here)."""
    import dsc.zeroshot as zs

    model = sliding_gemma2(len(tokenizer)) if family == "gemma2" else make_model(family, len(tokenizer))
    long = " ".join(CORPUS[:20])  # > 256 tokens: truncated from the left
    pairs = [(s[: s.rfind(" ")], s[s.rfind(" "):]) for s in CORPUS[:4]] + \
            [("Once upon a time", c) for c in (" there", " a cat who liked", " the sun was warm and blue")] + \
            [("The sun was", c) for c in (" warm", " blue")] + [("The sky was", c) for c in (" blue", " warm")] + \
            [(long, " and a dragon."), (long, " The end")]
    requests = encode_requests(tokenizer, pairs, None)
    assert len(requests[-1][0]) + len(requests[-1][1]) > 257
    shared = []
    monkeypatch.setattr(zs, "_shared_batch", lambda *a: shared.append(len(a[2])) or _shared_batch(*a))
    one = loglikelihoods(model, requests, batch_size=1)
    for batch in (3, 64):
        many = loglikelihoods(model, requests, batch_size=batch)
        assert [g for _, g in many] == [g for _, g in one]
        assert max(abs(a[0] - b[0]) for a, b in zip(many, one)) < 1e-4
    # "The sun/sky was" (5 tokens, continuations shorter) share their context, together at batch 64;
    # "Once upon a time" (11 tokens, a 13-token continuation) runs whole.
    assert shared == [1, 1, 1, 1, 2]
    ref = [reference(model, c, k, 256) for c, k in requests]
    assert max(abs(a[0] - b[0]) for a, b in zip(one, ref)) < 1e-4 and [g for _, g in one] == [g for _, g in ref]


class CharTokenizer:
    """One token per character (ids = code points), no special tokens."""

    bos_token = bos_token_id = None
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


class BigramLM(torch.nn.Module):
    """log p(next | previous character) read from a table: logliks are known by hand."""

    def __init__(self, logprobs: dict[str, dict[str, float]], vocab: int = 128):
        super().__init__()
        self.config = type("Config", (), {"max_position_embeddings": 64})()
        table = torch.empty(vocab, vocab)
        for prev in range(vocab):
            given = {ord(c): lp for c, lp in logprobs.get(chr(prev), {}).items()}
            rest = math.log((1 - sum(math.exp(v) for v in given.values())) / (vocab - len(given)))
            table[prev] = rest
            for tok, lp in given.items():
                table[prev, tok] = lp
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        return type("Out", (), {"logits": self.table[input_ids][:, -logits_to_keep:]})()  # (B, K, V)


def test_acc_and_acc_norm_by_hand(tmp_path):
    """Choices "a" and "bbbb" after "...Answer:": loglik(" a") = -1 - 1 = -2,
    loglik(" bbbb") = -1 - 4 × 1.375 = -6.5. acc picks "a"; acc_norm compares -2 / 1 with
    -6.5 / 4 = -1.625 and picks "bbbb" (counting the delimiter, -2 / 2 < -6.5 / 5, it would not)."""
    model = BigramLM({":": {" ": -1.0}, " ": {"a": -1.0, "b": -1.375}, "b": {"b": -1.375}})
    task = MultipleChoiceTask(path=str(jsonl(tmp_path / "mc.jsonl", MC)))
    items, _ = load_items(task, tmp_path)
    scores = score_items(model, CharTokenizer(), task, items)
    assert scores[0]["loglik"] == pytest.approx([-2.0, -6.5], abs=1e-5)
    assert [(s["pred"], s["pred_norm"]) for s in scores] == [(0, 1), (0, 1)]
    res = evaluate_task(model, CharTokenizer(), task, tmp_path)
    assert (res["acc"], res["acc_norm"], res["items"]) == (0.5, 0.5, 2)
    assert res["acc_stderr"] == pytest.approx(0.5)  # lm-eval's mean_stderr: sample std / sqrt(n)
    assert res["protocol"]["bos"] is False and res["protocol"]["template"] == "{query}\nAnswer:"


def test_lambada_acc_and_perplexity_by_hand(tmp_path):
    """"Q aaa": every token is the argmax (greedy), loglik -0.5 - 1 - 0.5 - 0.5 = -2.5;
    "Q bb": " b" is not the argmax after " ", loglik -0.5 - 1.375 - 1.375 = -3.25."""
    model = BigramLM({"Q": {" ": -0.5}, " ": {"a": -1.0, "b": -1.375}, "a": {"a": -0.5}, "b": {"b": -1.375}})
    task = LambadaTask(path=str(jsonl(tmp_path / "l.jsonl", [{"text": "Q aaa"}, {"text": "Q bb"}])))
    res = evaluate_task(model, CharTokenizer(), task, tmp_path)
    assert res["acc"] == 0.5 and res["acc_norm"] is None
    assert res["perplexity"] == pytest.approx(math.exp((2.5 + 3.25) / 2), rel=1e-5)


STORIES = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
           "One day, a little boy named Tim went to the park with his mom. He saw a big red ball.",
           "The cat was very hungry. It looked for food in the kitchen and found a fish.",
           "Lily and her mom went to the store. They bought some apples and a cake for dinner.",
           "Tom had a small dog. The dog liked to run and play with a ball in the yard.",
           "The sun was shining and the birds were singing. Sue wanted to go outside and play.",
           "Ben was sad because he lost his toy. His friend helped him look for it under the bed.",
           "Once upon a time, there was a big tree in the forest. Many animals lived in the tree."]


def test_trained_model_prefers_real_endings(stories_dir, tmp_path):
    """stories260K picks a story's real last four words over the same words reordered (chance:
    50 %), and its tokenizer's BOS is recorded as lm-eval adds it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    for i, s in enumerate(STORIES):
        words = s.split(" ")
        real, shuffled = " ".join(words[-4:]), " ".join(words[-4:][::-1])
        rows.append({"query": " ".join(words[:-4]), "choices": [real, shuffled][:: 1 - 2 * (i % 2)], "gold": i % 2})
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tok = AutoTokenizer.from_pretrained(stories_dir)
    task = MultipleChoiceTask(path=str(jsonl(tmp_path / "s.jsonl", rows)), template="{query}")
    res = evaluate_task(model, tok, task, tmp_path)
    assert res["acc"] >= 0.75 and res["acc_norm"] >= 0.75
    assert res["protocol"]["bos"] is True  # a Llama tokenizer adds BOS; lm-eval (add_bos_token unset) keeps it


# ---- the evaluate stage -------------------------------------------------------------------------

def recipe(tmp_path: Path, text_file: Path, tasks: dict) -> dict:
    (tmp_path / "config.json").write_text("{}")
    return {"teacher": str(tmp_path), "data": {"t": {"type": "text", "path": str(text_file)}},
            "stages": [{"evaluate": {"tasks": tasks}}], "output": str(tmp_path / "out")}


BAD_TASKS = [  # (tasks, path in the message, words)
    ({"arc": {"type": "multiple_choice", "path": "missing.jsonl"}}, "stages[0].evaluate.tasks.arc.path",
     "file not found"),
    ({"piqa": {"type": "piqa", "path": "valid.jsonl"}}, "stages[0].evaluate.tasks.piqa.labels", "valid-labels.lst"),
    ({"arc": {"type": "multiple_choice", "path": "arc.jsonl", "limt": 5}}, "stages[0].evaluate.tasks.arc.limt",
     "did you mean limit"),
    ({"arc": {"type": "multiple_choise", "path": "arc.jsonl"}}, "stages[0].evaluate.tasks.arc.type",
     "did you mean multiple_choice"),
    ({"arc": {"type": "multiple_choice", "path": "arc.jsonl", "limit": 0}}, "stages[0].evaluate.tasks.arc.limit",
     "must be > 0"),
    ({"arc": {"type": "multiple_choice", "path": "arc.jsonl", "template": "{query"}},
     "stages[0].evaluate.tasks.arc.template", "not a format string"),
    ({"lam": {"type": "lambada"}}, "stages[0].evaluate.tasks.lam.path", "required"),
]


@pytest.mark.parametrize("tasks,path,words", BAD_TASKS)
def test_bad_tasks_fail_validation(tmp_path, text_file, tasks, path, words):
    jsonl(tmp_path / "arc.jsonl", MC)
    jsonl(tmp_path / "valid.jsonl", PIQA)
    with pytest.raises(DscInputError) as exc:
        validate(recipe(tmp_path, text_file, tasks), base_dir=tmp_path)
    assert any(p.path == path and words in p.message for p in exc.value.problems), str(exc.value)


def test_stage_reports_zero_shot_for_model_and_teacher(llama_dir, tokenizer, text_file, tmp_path):
    """Results under metrics[model|teacher]["zero_shot"][name]; relative paths start at the
    recipe's folder; the teacher is measured once per protocol."""
    from transformers import AutoModelForCausalLM

    jsonl(tmp_path / "arc.jsonl", [{"query": s[: s.rfind(" ")], "choices": [s[s.rfind(" ") + 1:], "dragon"],
                                    "gold": 0} for s in CORPUS[:4]])
    jsonl(tmp_path / "lambada.jsonl", [{"text": s} for s in CORPUS[:4]])
    tasks = {"arc": {"type": "multiple_choice", "path": "arc.jsonl", "template": "{query}"},
             "lam": {"type": "lambada", "path": "lambada.jsonl", "limit": 3}}
    cfg = validate(recipe(tmp_path, text_file, tasks), base_dir=tmp_path).stages[0].config
    assert isinstance(cfg.tasks["lam"], LambadaTask) and cfg.file_refs() == {"tasks.arc.path": "arc.jsonl",
                                                                             "tasks.lam.path": "lambada.jsonl"}
    cfg = cfg.model_copy(update={"speed": False, "context_length": 32})
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    student = make_model("llama", len(tokenizer), seed=1)
    ctx = Context.create(tokenizer, {"t": TextSource(path=str(text_file), block_size=32)}, teacher=teacher,
                         base_dir=tmp_path)
    m = apply_stage("evaluate", student, cfg, ctx).metrics
    for who in ("model", "teacher"):
        shots = m[who]["zero_shot"]
        assert set(shots) == {"arc", "lam"}
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items", "protocol"} <= set(shots["arc"])
        assert shots["lam"]["items"] == 3 and shots["lam"]["perplexity"] > 1 and shots["lam"]["acc_norm"] is None
    assert m["teacher"]["zero_shot"]["arc"]["protocol"] == m["model"]["zero_shot"]["arc"]["protocol"]
    assert m["teacher"]["zero_shot"]["lam"]["perplexity"] != m["model"]["zero_shot"]["lam"]["perplexity"]
    assert apply_stage("evaluate", student, cfg, ctx).metrics["teacher"] is m["teacher"]


def test_stage_error_names_task_field(llama_dir, tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    jsonl(tmp_path / "arc.jsonl", [MC[0], "{oops"])
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ctx = Context.create(tokenizer, {"t": TextSource(path=str(text_file), block_size=32)}, base_dir=tmp_path)
    cfg = EvaluateConfig.parse({"context_length": 32, "speed": False, "teacher": False,
                                "tasks": {"arc": {"type": "multiple_choice", "path": "arc.jsonl"}}}, "evaluate")
    with pytest.raises(DscInputError, match=r"tasks\.arc\.path: arc\.jsonl:2 is not JSON"):
        apply_stage("evaluate", model, cfg, ctx)


def test_dsc_eval_takes_tasks_as_yaml():
    from dsc.evaluate_cli import parse_sets

    cfg = parse_sets(["tasks={arc: {type: multiple_choice, path: arc.jsonl, limit: 50}}"])
    assert isinstance(cfg.tasks["arc"], MultipleChoiceTask) and cfg.tasks["arc"].limit == 50
