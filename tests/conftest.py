"""Tiny seeded models built from configs (Llama, Qwen2) with a tokenizer trained in-process,
and paths to the real models in ../shared (tests that need them skip where it is absent)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import math

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSC_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"

CORPUS = [
    "Once upon a time there was a little cat who liked to play in the garden.",
    "The sun was warm and the sky was blue, so the children went to the park.",
    "A small dog found a big red ball and ran to show it to his friend.",
    "She opened the old book and read a story about a brave knight and a dragon.",
] * 8


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences: real merges, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
                  eos_token_id=1)
    config = {"llama": LlamaConfig(**common, tie_word_embeddings=True), "qwen2": Qwen2Config(**common, tie_word_embeddings=False)}[family]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe")
TINY_DSV3 = SHARED / "models" / "tiny-deepseek-v3"


def make_moe(family: str, vocab: int, seed: int = 0):
    """A tiny mixture-of-experts of `family`, 4 layers, with a dense layer among them. DeepSeek-V3:
    MLA (q and kv low rank), first layer dense, 1 shared + 8 routed experts in 2 groups."""
    from transformers import (AutoModelForCausalLM, DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2, bos_token_id=0,
                  eos_token_id=1, pad_token_id=None)
    if family == "mixtral":
        config = MixtralConfig(**common, num_local_experts=4)
    elif family == "olmoe":
        config = OlmoeConfig(**common, num_experts=4)
    elif family == "deepseek_v3":
        config = DeepseekV3Config(**{**common, "num_key_value_heads": 4}, n_routed_experts=8, n_group=2, topk_group=1,
                                  n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
                                  q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                  v_head_dim=8, head_dim=4, tie_word_embeddings=False)
    else:
        cls = Qwen2MoeConfig if family == "qwen2_moe" else Qwen3MoeConfig
        extra = {"shared_expert_intermediate_size": 24} if family == "qwen2_moe" else {"head_dim": 8}
        config = cls(**common, num_experts=4, moe_intermediate_size=16, mlp_only_layers=[1], decoder_sparse_step=1,
                     **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "deepseek_v3":  # a trained model's correction bias is not zero: make the tests see it
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_dsv3_dir() -> Path:
    if not (TINY_DSV3 / "config.json").is_file():
        pytest.skip(f"{TINY_DSV3} is absent (../shared not beside this checkout)")
    return TINY_DSV3


def sample_stories(n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) token ids sampled from stories260K, starting at its BOS. tiny-deepseek-v3 was
    trained on seed 0's samples: any other seed is held-out text for it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    torch.manual_seed(seed)
    ones = torch.ones(n, 1, dtype=torch.long)
    with torch.no_grad():
        return model.generate(ones, attention_mask=ones, do_sample=True, max_new_tokens=length - 1,
                              min_new_tokens=length - 1)


@pytest.fixture(scope="session")
def dsv3_text(tiny_dsv3_dir, stories_dir):
    """Calibration (32 × 128, seed 1) and held-out (32 × 128, seed 2) text for tiny-deepseek-v3."""
    return sample_stories(32, 128, seed=1), sample_stories(32, 128, seed=2)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory, tokenizer) -> Path:
    """A saved tiny model directory (safetensors + config + tokenizer), per family."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_model(request.param, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"{STORIES} is absent (../shared not beside this checkout)")
    return STORIES


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 4), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/dsc from tests."""
    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "dsc-cache"))


def reference_perplexity(model, stream, ctx_len, stride):
    """The transformers perplexity guide's loop: labels=-100 on context, loss × scored tokens."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + ctx_len, len(stream))
        trg = end - prev_end
        ids = stream[begin:end][None]
        labels = ids.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll += loss.item() * n
        count += n
        prev_end = end
        if end == len(stream):
            break
    return math.exp(nll / count), count



class Killed(Exception):
    """Stands in for a process killed mid-training."""


def kill_training_at(monkeypatch, step: int) -> None:
    """Make the shared training loop raise Killed when it reaches optimizer step `step`."""
    from dsc.distill import loop as loop_module

    original = loop_module.Loop.train_step

    def train_step(self):
        if self.step == step:
            raise Killed()
        return original(self)

    monkeypatch.setattr(loop_module.Loop, "train_step", train_step)


def run_cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`dsc ...` in a subprocess, as a user or a job runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=full_env)
