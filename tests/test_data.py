"""Data sources, packing, seeded splits and the token cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CORPUS, make_model
from dsc.data import pipeline
from dsc.data.pipeline import assign_splits, prepare, sample_from_teacher
from dsc.data.sources import DatasetsSource, JsonlSource, ParquetSource, TeacherSource, TextSource
from dsc.errors import DscInputError


def expected_stream(tokenizer, docs):
    ids = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_file_sources_agree(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in CORPUS))
    pq.write_table(pa.table({"body": CORPUS}), tmp_path / "d.parquet")
    want = expected_stream(tokenizer, CORPUS)
    for src in (JsonlSource(path="d.jsonl", field="body", block_size=16),
                ParquetSource(path="d.parquet", field="body", block_size=16)):
        data = prepare("d", src, tokenizer, base_dir=tmp_path, seed=0)
        assert data.tokens.tolist() == want


def test_datasets_folder_source(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": CORPUS}).save_to_disk(str(tmp_path / "ds"))
    data = prepare("d", DatasetsSource(path="ds", block_size=16), tokenizer, base_dir=tmp_path, seed=0)
    assert data.tokens.tolist() == expected_stream(tokenizer, CORPUS)


def test_text_line_join_and_max_tokens(tmp_path, tokenizer):
    (tmp_path / "w.txt").write_bytes(b" = Title = \r\n\r\n First line .\r\n Second line .\r\n")
    src = TextSource(path="w.txt", line_join="\n\n", block_size=2)
    data = prepare("w", src, tokenizer, base_dir=tmp_path, seed=0)
    assert data.tokens.tolist() == expected_stream(tokenizer, [" = Title = \n\n First line .\n\n Second line ."])
    short = prepare("w", TextSource(path="w.txt", max_tokens=5, block_size=2), tokenizer, base_dir=tmp_path, seed=0)
    assert len(short.tokens) == 5


def test_splits_are_seeded_disjoint_and_complete():
    fr = {"calibration": 0.1, "train": 0.7, "eval": 0.2}
    a, b, c = assign_splits(50, fr, 0), assign_splits(50, fr, 0), assign_splits(50, fr, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["eval"], c["eval"])
    together = np.concatenate(list(a.values()))
    assert sorted(together.tolist()) == list(range(50))
    assert [len(a[k]) for k in ("calibration", "train", "eval")] == [5, 35, 10]


def test_blocks_and_missing_split(tmp_path, tokenizer, text_file):
    src = TextSource(path=str(text_file), block_size=8, splits={"train": 0.5, "eval": 0.5})
    data = prepare("t", src, tokenizer, base_dir=tmp_path, seed=3)
    n = len(data.tokens) // 8
    assert data.blocks("train").shape[1] == 8
    assert len(data.blocks("train")) + len(data.blocks("eval")) == n
    assert data.stream("eval").ndim == 1
    with pytest.raises(DscInputError, match="split 'calibration' has no blocks"):
        data.blocks("calibration")


def test_too_little_data_is_input_error(tmp_path, tokenizer):
    (tmp_path / "s.txt").write_text("tiny")
    with pytest.raises(DscInputError, match="fewer than block_size"):
        prepare("s", TextSource(path="s.txt"), tokenizer, base_dir=tmp_path, seed=0)


def test_cache_is_keyed_by_content(tmp_path, tokenizer, text_file, monkeypatch):
    src = TextSource(path=str(text_file), block_size=8)
    first = prepare("t", src, tokenizer, base_dir=tmp_path, cache_dirs=(tmp_path / "c",), seed=0)
    assert len(list((tmp_path / "c" / "tokens").glob("*.safetensors"))) == 1

    def no_read(*a, **k):
        raise AssertionError("cache miss: the source was read again")

    monkeypatch.setattr(pipeline, "read_documents", no_read)
    again = prepare("t", src, tokenizer, base_dir=tmp_path, cache_dirs=(tmp_path / "c",), seed=0)
    assert torch.equal(first.tokens, again.tokens)
    text_file.write_text(text_file.read_text() + " changed")  # new content → new key → a read
    with pytest.raises(AssertionError, match="cache miss"):
        prepare("t", src, tokenizer, base_dir=tmp_path, cache_dirs=(tmp_path / "c",), seed=0)


def test_teacher_sampling_is_seeded_and_leaves_global_rng(tokenizer):
    model = make_model("llama", len(tokenizer))
    src = TeacherSource(num_sequences=3, length=10, batch_size=2, block_size=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample_from_teacher(model, tokenizer, src, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample_from_teacher(model, tokenizer, src, seed=7)
    c = sample_from_teacher(model, tokenizer, src, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 3 * 11  # 10 sampled tokens + EOS per sequence


def test_sampled_data_cache_is_keyed_by_the_teacher(tokenizer, tmp_path):
    """Two models, one tokenizer, one cache: each is evaluated on its own samples."""
    from dsc import Context

    src = {"gen": TeacherSource(num_sequences=2, length=20, block_size=8)}
    a = Context.create(tokenizer, src, teacher=make_model("llama", len(tokenizer), seed=0), cache_dir=tmp_path)
    b = Context.create(tokenizer, src, teacher=make_model("llama", len(tokenizer), seed=1), cache_dir=tmp_path)
    assert not torch.equal(a.data["gen"].tokens, b.data["gen"].tokens)
    c = Context.create(tokenizer, src, teacher=make_model("llama", len(tokenizer), seed=0), cache_dir=tmp_path)
    assert torch.equal(a.data["gen"].tokens, c.data["gen"].tokens)
