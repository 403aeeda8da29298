"""`dsc eval MODEL`: the evaluate stage on one model, outside a recipe."""
from __future__ import annotations

from pathlib import Path

from dsc.config import Config
from dsc.context import Context, default_cache_dir, pick_device
from dsc.data.sources import JsonlSource, ParquetSource, TeacherSource, TextSource
from dsc.errors import DscInputError
from dsc.models import ModelRef, load_model, load_tokenizer, resolve
from dsc.stages.evaluate import EvaluateConfig, measure


def data_source(args) -> Config:
    """--data: a file (type from its suffix) or 'generated'; all of it is scored (split: all)."""
    common = {"max_tokens": args.max_tokens, "splits": {"eval": 1.0}}
    if args.data == "generated":
        return TeacherSource(**common)
    path = Path(args.data)
    if not path.is_file():
        raise DscInputError("--data", f"file not found: {path}")
    if path.suffix == ".jsonl":
        return JsonlSource(path=str(path.resolve()), field=args.field, **common)
    if path.suffix == ".parquet":
        return ParquetSource(path=str(path.resolve()), field=args.field, **common)
    return TextSource(path=str(path.resolve()), line_join=args.line_join, **common)


def parse_sets(pairs: list[str]) -> EvaluateConfig:
    import yaml

    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DscInputError("--set", f"expected KEY=VALUE, got {pair!r}")
        fields[key] = yaml.safe_load(value)
    return EvaluateConfig.parse({"split": "all", **fields, "teacher": False}, "--set")


def evaluate_model_cli(args, log) -> dict:
    cfg = parse_sets(args.set)
    ref = ModelRef(path=args.model, trust_remote_code=args.trust_remote_code)
    source = resolve(ref, Path.cwd(), field="model")
    tokenizer = load_tokenizer(source, ref, field="model")
    device = pick_device(args.device)
    model = load_model(source, ref, field="model").to(device)
    cache = default_cache_dir()
    # 'generated' data is sampled from the model being evaluated: it is its own teacher here
    ctx = Context.create(tokenizer, {"data": data_source(args)}, teacher=model, device=str(device),
                         cache_dir=cache, log=log)
    return measure(model, cfg, ctx, Path(args.model).name)
