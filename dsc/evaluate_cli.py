"""`dsc eval MODEL`: the evaluate stage on one model, outside a recipe."""
from __future__ import annotations

from pathlib import Path

from dsc import paths
from dsc.config import Config
from dsc.context import Context, default_cache_dir, pick_device
from dsc.data.sources import JsonlSource, ParquetSource, TeacherSource, TextSource
from dsc.errors import DscInputError
from dsc.models import ModelRef, load_model, load_tokenizer, resolve
from dsc.stages.evaluate import EvaluateConfig, measure


def data_source(args) -> Config:
    """--data: a file (type from its suffix) or 'generated'; all of it is scored (split: all)."""
    common = {"max_tokens": args.max_tokens, "splits": {"eval": 1.0}}
    if args.max_tokens is not None:  # a short --max-tokens still makes whole blocks
        common["block_size"] = max(2, min(512, args.max_tokens))
    if args.data == "generated":
        return TeacherSource.parse(common, "--data")
    path = Path(args.data)
    found = paths.kind(path, "--data")
    if found != "file":
        raise DscInputError("--data", f"{path} is a folder, not a file" if found == "dir" else f"file not found: {path}")
    if path.suffix == ".jsonl":
        return JsonlSource.parse({"path": str(path.resolve()), "field": args.field, **common}, "--data")
    if path.suffix == ".parquet":
        return ParquetSource.parse({"path": str(path.resolve()), "field": args.field, **common}, "--data")
    return TextSource.parse({"path": str(path.resolve()), "line_join": args.line_join, **common}, "--data")


def parse_sets(pairs: list[str]) -> EvaluateConfig:
    import yaml

    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DscInputError("--set", f"expected KEY=VALUE, got {pair!r}")
        try:
            fields[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise DscInputError(f"--set {key}", f"{value!r} is not a YAML value: {' '.join(str(exc).split())}") from None
    return EvaluateConfig.parse({"split": "all", **fields, "teacher": False}, "--set")


def evaluate_model_cli(args, log) -> dict:
    cfg = parse_sets(args.set)
    data = data_source(args)  # checked before the model loads
    ref = ModelRef(path=args.model, trust_remote_code=args.trust_remote_code)
    source = resolve(ref, Path.cwd(), field="model")
    tokenizer = load_tokenizer(source, ref, field="model")
    device = pick_device(args.device)
    model = load_model(source, ref, field="model").to(device)
    cache = default_cache_dir()
    # 'generated' data is sampled from the model being evaluated: it is its own teacher here
    ctx = Context.create(tokenizer, {"data": data}, teacher=model, device=str(device),
                         cache_dir=cache, log=log)
    return measure(model, cfg, ctx, Path(args.model).name)
