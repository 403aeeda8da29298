"""distill / lora stages and the shared training loop (tiny seeded models; stories260K for the
quality floor)."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS, Killed, kill_training_at, make_model, run_cli
from dsc.context import Context
from dsc.data.pipeline import TokenData, assign_splits
from dsc.data.sources import TeacherSource
from dsc.distill import DistillConfig, LoraConfig, apply, apply_lora
from dsc.distill import loop as loop_module
from dsc.distill.losses import default_layer_map, divergence, logit_kd, over_topk, teacher_topk
from dsc.errors import DscInputError, FieldError
from dsc.prune import PruneConfig, apply as prune
from dsc.recipe import validate


# -- losses ----------------------------------------------------------------------------------------

def test_divergences():
    torch.manual_seed(0)
    t, s = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    lt, ls = t.log_softmax(-1), s.log_softmax(-1)
    ref = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(divergence(lt, ls, "forward"), ref, atol=1e-6)
    assert torch.allclose(divergence(lt, ls, "reverse"), divergence(ls, lt, "forward"))
    jsd = divergence(lt, ls, "jsd")
    assert torch.allclose(jsd, divergence(ls, lt, "jsd"), atol=1e-6) and (jsd <= math.log(2) + 1e-6).all()
    assert divergence(lt, lt, "forward").abs().max() < 1e-6
    # top-k over the whole vocabulary is the exact divergence; a smaller k bounds it from below
    full = logit_kd(s, teacher_logits=t, temperature=2.0)
    assert torch.allclose(logit_kd(s, teacher_logits=t, temperature=2.0, top_k=50), full, atol=1e-5)
    assert logit_kd(s, teacher_logits=t, temperature=2.0, top_k=5) <= full + 1e-6


def test_topk_buckets_are_distributions():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    log_t, idx = teacher_topk(t, 6, 1.5)
    assert log_t.shape[-1] == 7 and torch.allclose(log_t.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert torch.allclose(over_topk(s, idx, 1.5).exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    # the tail is exact even when the top-k holds nearly all the mass
    peaked = torch.full((1, 1, 40), -30.0)
    peaked[..., 0] = 30.0
    log_t, _ = teacher_topk(peaked, 1, 1.0)
    assert torch.allclose(log_t[..., 1], torch.tensor(math.log(39) - 60.0), atol=1e-3)
    with pytest.raises(FieldError, match="top_k: 41 exceeds the vocabulary"):
        teacher_topk(peaked, 41, 1.0)
    masked = t.clone()
    masked[..., -3:] = float("-inf")  # padded vocabulary entries: no NaN
    assert torch.isfinite(logit_kd(s, teacher_logits=masked))


def test_default_layer_map_spreads_over_the_teacher():
    assert default_layer_map(2, 4) == {1: 2, 2: 4}
    assert default_layer_map(3, 3) == {1: 1, 2: 2, 3: 3}
    assert default_layer_map(3, 12)[3] == 12


# -- helpers ---------------------------------------------------------------------------------------

def tiny_data(tokenizer, block=32) -> TokenData:
    stream = torch.cat([torch.tensor(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for t in CORPUS * 4])
    n = len(stream) // block
    return TokenData("d", stream, block, assign_splits(n, {"train": 0.75, "eval": 0.25}, 0), "tiny")


def tiny_ctx(tokenizer, teacher, work_dir=None) -> Context:
    ctx = Context.create(tokenizer, teacher=teacher, seed=0)
    ctx.data.put(tiny_data(tokenizer))
    ctx.work_dir = work_dir
    return ctx


def perturbed(model, scale=0.05, seed=1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


@torch.no_grad()
def held_out_kl(student, teacher, blocks) -> float:
    return float(logit_kd(student(blocks).logits, teacher_logits=teacher(blocks).logits))


# -- stages ----------------------------------------------------------------------------------------

def test_distill_brings_a_pruned_student_closer_than_lm_finetuning(stories_dir):
    """Quality floor on trained weights: stories260K pruned (heads + channels), then the same
    steps of logit KD vs LM-loss fine-tuning: KD ends with the lower held-out KL to the teacher,
    and both start from the same pruned model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    teacher = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    src = TeacherSource(num_sequences=64, length=127, block_size=128, splits={"calibration": 0.25, "train": 0.5,
                                                                             "eval": 0.25})
    ctx = Context.create(tok, {"gen": src}, teacher=teacher, seed=0)
    pruned = prune(AutoModelForCausalLM.from_pretrained(stories_dir).eval(),
                   PruneConfig(heads=0.5, channels=0.5, num_samples=16, reconstruct=False), ctx).model
    held = ctx.data["gen"].blocks("eval")
    common = dict(steps=40, batch_size=8, lr=2e-3, eval_split="none")
    kd = apply(copy.deepcopy(pruned), DistillConfig(**common, kl=1.0), ctx).model
    lm = apply(copy.deepcopy(pruned), DistillConfig(**common, kl=0.0, ce=1.0), ctx).model
    kl = {name: held_out_kl(m, teacher, held) for name, m in (("pruned", pruned), ("kd", kd), ("lm", lm))}
    print(kl)
    assert kl["kd"] < 0.8 * kl["lm"] and kl["kd"] < 0.5 * kl["pruned"]


def test_feature_kd_trains_a_narrower_student_through_projections(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    teacher = make_model("llama", len(tokenizer))
    torch.manual_seed(3)
    student = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True))
    ctx = tiny_ctx(tokenizer, teacher)
    keys = set(student.state_dict())
    out = apply(student, DistillConfig(steps=30, lr=5e-3, kl=0.0, features=1.0, eval_batches=2), ctx)
    m = out.metrics
    assert m["eval"]["features"] < 0.7 * m["eval_start"]["features"]
    assert set(out.model.state_dict()) == keys  # the projections trained alongside, then were dropped
    assert out.model.config.hidden_size == 16


def test_lora_merge_reproduces_the_adapter(tokenizer):
    """The merged plain model computes what the trained adapter computed."""
    from dsc.distill import lora
    from dsc.distill.stage import train_student

    teacher = make_model("llama", len(tokenizer))
    ctx = tiny_ctx(tokenizer, teacher)
    cfg = LoraConfig(steps=15, lr=5e-3, rank=4, dropout=0.0, eval_split="none")
    peft_model, _ = lora.wrap(perturbed(teacher), cfg, ctx)
    peft_model, metrics = train_student(peft_model, cfg, ctx)
    ids = ctx.data["d"].blocks("eval")
    with torch.no_grad():
        unmerged = peft_model.eval()(ids).logits
        merged_model = lora.merge(peft_model, cfg)
        merged = merged_model(ids).logits
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged_model.state_dict())
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_lora_stage_recovers_and_counts_its_parameters(tokenizer):
    teacher = make_model("llama", len(tokenizer))
    ctx = tiny_ctx(tokenizer, teacher)
    student = perturbed(teacher, 0.1)
    ids = ctx.data["d"].blocks("eval")
    out = apply_lora(copy.deepcopy(student), LoraConfig(steps=30, lr=1e-2, rank=8, eval_batches=2), ctx)
    assert held_out_kl(out.model, teacher, ids) < 0.8 * held_out_kl(student, teacher, ids)
    linears = [m for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert out.metrics["trainable_params"] == sum(8 * (m.in_features + m.out_features) for m in linears)


def test_qlora_without_cuda_says_why(tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: QLoRA runs")
    ctx = tiny_ctx(tokenizer, make_model("llama", len(tokenizer)))
    with pytest.raises(FieldError, match="needs a CUDA device.*quantize_base: none") as err:
        apply_lora(make_model("llama", len(tokenizer)), LoraConfig(steps=1, quantize_base="nf4"), ctx)
    assert err.value.path == "quantize_base"


def test_lora_unknown_target_modules_lists_the_real_ones(tokenizer):
    ctx = tiny_ctx(tokenizer, make_model("llama", len(tokenizer)))
    with pytest.raises(FieldError, match="q_proj") as err:
        apply_lora(make_model("llama", len(tokenizer)), LoraConfig(steps=1, target_modules=["qkv"]), ctx)
    assert err.value.path == "target_modules"


def test_gradient_checkpointing_and_accumulation_change_memory_not_results(tokenizer, monkeypatch):
    """Recomputing activations trains the same weights; 2 × batch 2 accumulated = 1 × batch 4."""
    flags, original = [], loop_module.Loop.train_step
    monkeypatch.setattr(loop_module.Loop, "train_step", lambda self: flags.append(
        self.model.student.is_activation_checkpointing) or original(self))
    teacher = make_model("llama", len(tokenizer))
    common = dict(steps=4, lr=3e-3, eval_batches=1, features=0.5)
    runs = [apply(perturbed(teacher), DistillConfig(**common, **kw), tiny_ctx(tokenizer, teacher)).model
            for kw in ({"batch_size": 4}, {"batch_size": 4, "gradient_checkpointing": True},
                       {"batch_size": 2, "grad_accum": 2})]
    assert flags == [False] * 4 + [True] * 4 + [False] * 4  # on during the checkpointed run only
    for other in runs[1:]:
        a, b = runs[0].state_dict(), other.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_vocabulary_mismatch_is_refused_before_training(tokenizer):
    ctx = tiny_ctx(tokenizer, make_model("llama", len(tokenizer)))
    other = make_model("llama", len(tokenizer) + 7)
    with pytest.raises(FieldError, match="vocabularies differ"):
        apply(other, DistillConfig(steps=1), ctx)


def test_teacher_cache_trains_like_the_live_teacher(tokenizer, tmp_path):
    """Top-k log-probs precomputed to disk once (and reused) train the student as the live
    teacher does with the same top_k."""
    teacher = make_model("llama", len(tokenizer))
    student = perturbed(teacher)
    cfg = dict(steps=10, lr=1e-3, top_k=16, eval_batches=2)
    live = apply(copy.deepcopy(student), DistillConfig(**cfg), tiny_ctx(tokenizer, teacher)).metrics
    ctx = tiny_ctx(tokenizer, teacher, work_dir=tmp_path / "work")
    cached = apply(copy.deepcopy(student), DistillConfig(**cfg, teacher_cache=True), ctx).metrics
    assert math.isclose(cached["eval"]["kl"], live["eval"]["kl"], rel_tol=1e-3)
    files = sorted((tmp_path / "work").glob("teacher_topk_*.safetensors"))
    assert [f.name for f in files] == ["teacher_topk_eval.safetensors", "teacher_topk_train.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    for f in (tmp_path / "work").iterdir():  # keep the cache, drop the checkpoint and log
        if not f.name.startswith("teacher_topk"):
            f.unlink() if f.is_file() else __import__("shutil").rmtree(f)
    apply(copy.deepcopy(student), DistillConfig(**cfg, teacher_cache=True), ctx)
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_config_errors_name_the_field():
    base = {"teacher": "org/m", "output": "x"}
    cases = {
        "give exactly one budget": {"distill": {"steps": 3, "tokens": 100}},
        "teacher_cache stores the teacher's top-k": {"distill": {"steps": 3, "teacher_cache": True}},
        "the loss is empty": {"distill": {"steps": 3, "kl": 0}},
        r"stages\[0\]\.lora\.rank: must be > 0": {"lora": {"steps": 3, "rank": 0}},
        "lora trains a small adapter: replicate the model with parallel: ddp": {"lora": {"steps": 3,
                                                                                        "parallel": "fsdp"}},
        r"stages\[0\]\.distill\.eval_split: source 'default' gives split 'eval' no blocks":
            {"distill": {"steps": 3}},
    }
    for message, stage in cases.items():
        raw = {**base, "stages": [stage]}
        if "eval_split" in message:
            raw["data"] = {"default": {"type": "teacher", "splits": {"train": 1.0}}}
        with pytest.raises(DscInputError, match=message):
            validate(raw)


# -- the loop: resume ----------------------------------------------------------------------------

def _train(tokenizer, work_dir, kill_at=None, monkeypatch=None, lora=False):
    teacher = make_model("llama", len(tokenizer))
    ctx = tiny_ctx(tokenizer, teacher, work_dir)
    if kill_at is not None:
        kill_training_at(monkeypatch, kill_at)
    common = dict(steps=12, lr=3e-3, save_every=4, eval_every=5, eval_batches=2, grad_accum=2, batch_size=2)
    if lora:
        return apply_lora(perturbed(teacher), LoraConfig(**common, rank=4, dropout=0.2), ctx)
    return apply(perturbed(teacher), DistillConfig(**common, ce=0.5), ctx)


@pytest.mark.parametrize("lora", [False, True], ids=["distill", "lora-dropout"])
def test_resume_mid_stage_matches_an_uninterrupted_run(tokenizer, tmp_path, monkeypatch, lora):
    """Killed at step 10 (last checkpoint: step 8): the rerun continues from step 8 and ends with
    the weights, losses and evaluation of a run that was never interrupted (optimizer, schedule,
    data position and dropout RNG all restored)."""
    whole = _train(tokenizer, tmp_path / "a", lora=lora)
    with pytest.raises(Killed):
        _train(tokenizer, tmp_path / "b", kill_at=10, monkeypatch=monkeypatch, lora=lora)
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "checkpoint" / "meta.json").read_text())["step"] == 8
    resumed = _train(tokenizer, tmp_path / "b", lora=lora)
    assert resumed.metrics["resumed_at_step"] == 8
    assert resumed.metrics["eval"] == whole.metrics["eval"]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [e["step"] for e in reference]  # nothing logged twice


# -- the CLI: kill -9 mid-stage ---------------------------------------------------------------------

SLOW_STEPS = ("import sys, time, dsc.distill.loop as l; f = l.Loop.train_step; "
              "l.Loop.train_step = lambda self: (time.sleep(0.15), f(self))[1]; "
              "from dsc.cli import main; sys.exit(main())")


def test_kill_9_mid_distill_resumes_from_its_checkpoint(llama_dir, text_file, tmp_path):
    """`dsc run` killed while distilling: the rerun keeps the prune stage, resumes training from
    the last checkpoint, and publishes the model an uninterrupted run publishes."""
    stages = [{"prune": {"channels": 0.5, "num_samples": 2, "split": "train"}},
              {"distill": {"steps": 16, "save_every": 4, "batch_size": 2, "lr": 3e-3, "eval_batches": 1}}]

    def recipe(out):
        raw = {"teacher": str(llama_dir), "output": str(out), "stages": stages,
               "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                              "splits": {"train": 0.75, "eval": 0.25}}}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(json.dumps(raw))
        return path

    whole = recipe(tmp_path / "whole")
    assert run_cli("run", whole).returncode == 0
    killed = recipe(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, "run", str(killed)], stderr=subprocess.PIPE, text=True)
    work = tmp_path / "killed" / "work"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(work.glob("*/checkpoint/meta.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "stages" / "01-distill").exists()
    prune_stamp = (tmp_path / "killed" / "stages" / "00-prune" / "stage.json").stat().st_mtime_ns
    res = run_cli("--log-format", "json", "run", killed)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "train_resume" and e["step"] >= 4 for e in events)
    assert (tmp_path / "killed" / "stages" / "00-prune" / "stage.json").stat().st_mtime_ns == prune_stamp
    assert not work.exists() or not any(work.iterdir())
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    metrics = json.loads((tmp_path / "killed" / "stages" / "01-distill" / "metrics.json").read_text())
    assert metrics["resumed_at_step"] >= 4
    assert (tmp_path / "killed" / "stages" / "01-distill" / "train_log.jsonl").is_file()


def test_sigterm_mid_distill_checkpoints_that_step_and_exits_3(llama_dir, text_file, tmp_path):
    """Kubernetes stops a pod with SIGTERM: the step in progress finishes, is checkpointed (even
    between save_every steps), the run exits 3, and the rerun continues from exactly there."""
    stages = [{"distill": {"steps": 12, "save_every": 0, "log_every": 1, "batch_size": 2, "lr": 3e-3,
                           "eval_batches": 1}}]
    raw = {"teacher": str(llama_dir), "stages": stages,
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                          "splits": {"train": 0.75, "eval": 0.25}}}}
    for name in ("whole", "stopped"):
        (tmp_path / f"{name}.yaml").write_text(json.dumps({**raw, "output": str(tmp_path / name)}))
    assert run_cli("run", tmp_path / "whole.yaml").returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, "run", str(tmp_path / "stopped.yaml")],
                            stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "stopped" / "work"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and \
            sum(len(p.read_text().splitlines()) for p in logs.glob("*/train_log.jsonl")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err[-2000:]
    step = json.loads(next(logs.glob("*/checkpoint/meta.json")).read_text())["step"]
    assert 2 <= step < 12
    res = run_cli("run", tmp_path / "stopped.yaml")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "stopped" / "stages" / "00-distill" / "metrics.json").read_text())
    assert metrics["resumed_at_step"] == step
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# -- distributed: DDP and FSDP on 2 CPU processes (gloo) -----------------------------------------------

def _torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           worker, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains(mode, tmp_path):
    """torchrun × 2 with batch 2 per process = one process with batch 4: same weights and
    evaluation (DDP replicas; FSDP shards, checkpoints gathered to full state dicts). A second
    launch on the same work folder resumes from the sharded run's checkpoint to the same end."""
    from distributed_worker import run

    run("ddp", 4, tmp_path / "single.pt")
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    for attempt in ("first", "resumed"):
        res = _torchrun(mode, 2, tmp_path / f"{attempt}.pt", tmp_path / "work")
        assert res.returncode == 0, res.stderr[-3000:]
        got = torch.load(tmp_path / f"{attempt}.pt", weights_only=False)
        assert got["metrics"]["processes"] == 2
        assert got["metrics"]["resumed_at_step"] == (0 if attempt == "first" else 3)
        for name, ref in single["state"].items():
            assert torch.allclose(got["state"][name], ref, atol=1e-5), (attempt, name)
        for key, ref in single["metrics"]["eval"].items():
            assert math.isclose(got["metrics"]["eval"][key], ref, rel_tol=1e-4), (attempt, key)


def test_dsc_run_under_torchrun_matches_one_process(llama_dir, text_file, tmp_path):
    """`torchrun -m dsc.cli run`: rank 0 owns the run directory and runs prune alone; both
    processes train; the published model equals a one-process run with twice the batch."""
    def recipe(name, batch):
        raw = {"teacher": str(llama_dir), "output": str(tmp_path / name),
               "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                              "splits": {"train": 0.75, "eval": 0.25}}},
               "stages": [{"prune": {"channels": 0.5, "num_samples": 2, "split": "train"}},
                          {"distill": {"steps": 6, "batch_size": batch, "lr": 3e-3, "eval_batches": 1,
                                       "save_every": 3}}]}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(raw))
        return tmp_path / f"{name}.yaml"

    assert run_cli("run", recipe("one", 4)).returncode == 0
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dsc.cli", "run", str(recipe("two", 2))], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    metrics = json.loads((tmp_path / "two" / "stages" / "01-distill" / "metrics.json").read_text())
    assert metrics["processes"] == 2


def _small_student(path, tokenizer, vocab=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_recipe_student_is_distilled_from_the_teacher(llama_dir, text_file, tokenizer, tmp_path):
    """`student:` starts the stages from another (smaller) model of the teacher's tokenizer;
    feature KD trains through projections; OUT/model is the student's architecture."""
    student = _small_student(tmp_path / "student", tokenizer)
    raw = {"teacher": str(llama_dir), "student": str(student), "output": str(tmp_path / "out"),
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                          "splits": {"train": 0.75, "eval": 0.25}}},
           "stages": [{"distill": {"steps": 20, "lr": 5e-3, "kl": 1.0, "features": 1.0, "eval_batches": 2}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    res = run_cli("run", tmp_path / "r.yaml")
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["hidden_size"] == 16 and config["num_hidden_layers"] == 1
    metrics = json.loads((tmp_path / "out" / "stages" / "00-distill" / "metrics.json").read_text())
    assert metrics["eval"]["kl"] < metrics["eval_start"]["kl"]
    assert metrics["eval"]["features"] < metrics["eval_start"]["features"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "student" in manifest["fingerprints"]


def test_a_student_with_another_tokenizer_is_refused_before_training(llama_dir, text_file, tmp_path):
    from conftest import make_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["an entirely different corpus of words"] * 4,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    student = _small_student(tmp_path / "student", other, vocab=len(make_tokenizer()))
    raw = {"teacher": str(llama_dir), "student": str(student), "output": str(tmp_path / "out"),
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                          "splits": {"train": 0.75, "eval": 0.25}}},
           "stages": [{"distill": {"steps": 2}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    res = run_cli("run", tmp_path / "r.yaml")
    assert res.returncode == 2
    assert "student: its tokenizer differs from the teacher's" in res.stderr
    assert not any((tmp_path / "out" / "stages").glob("*"))


def test_training_stages_start_from_the_teacher_itself(llama_dir, text_file, tmp_path):
    """A recipe whose first stage trains: the working model is the (frozen) teacher object, which
    the stage must unfreeze without touching the teacher it distills from."""
    raw = {"teacher": str(llama_dir), "output": str(tmp_path / "out"),
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                          "splits": {"train": 0.75, "eval": 0.25}}},
           "stages": [{"distill": {"steps": 3, "lr": 1e-2, "kl": 1.0, "ce": 1.0, "eval_batches": 1}},
                      {"lora": {"steps": 3, "lr": 1e-2, "eval_batches": 1}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    res = run_cli("run", tmp_path / "r.yaml")
    assert res.returncode == 0, res.stderr
    distill = json.loads((tmp_path / "out" / "stages" / "00-distill" / "metrics.json").read_text())
    assert distill["eval"]["ce"] < distill["eval_start"]["ce"]
    assert distill["eval_start"]["kl"] < 1e-6 < distill["eval"]["kl"]  # the student left, the teacher stayed
    lora = json.loads((tmp_path / "out" / "stages" / "01-lora" / "metrics.json").read_text())
    assert lora["eval_start"]["kl"] > 0  # the teacher stayed the teacher
    assert lora["eval"]["kl"] < lora["eval_start"]["kl"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Training" in report and "| 0 | distill | 3 | 384 |" in report and "| 1 | lora | 3 |" in report
