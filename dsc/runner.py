"""`dsc run`: execute a validated recipe in a run directory, resuming after finished stages."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from dsc import __version__
from dsc.context import Context, DataStore, pick_device
from dsc.data.sources import source_fingerprint
from dsc.errors import DscInputError, RunInterrupted
from dsc.evaluation import disk_bytes
from dsc.fingerprint import hash_json, write_json, write_text
from dsc.models import fingerprint as model_fingerprint, load_checkpoint, load_model, load_tokenizer, replace_dir, \
    resolve, save_model
from dsc.recipe import Recipe
from dsc.registry import STAGES
from dsc.report import collect_metrics, write_report
from dsc.rundir import RunDir


def default_cache_dir(recipe: Recipe) -> Path:
    if recipe.cache_dir:
        return (recipe.base_dir / recipe.cache_dir).resolve()
    return Path(os.environ.get("DSC_CACHE_DIR", Path.home() / ".cache" / "dsc"))


def fingerprints(recipe: Recipe) -> tuple[dict, list[str]]:
    """Root fingerprints (teacher weights, data, seed) and the per-stage chain built on them."""
    source = resolve(recipe.teacher, recipe.base_dir)
    teacher = hash_json([model_fingerprint(source, recipe.teacher), recipe.teacher.model_dump()])
    data = {name: hash_json([source_fingerprint(src, recipe.base_dir, teacher), src.block_size, src.splits])
            for name, src in recipe.data.items()}
    root = {"teacher": teacher, "data": data, "seed": recipe.seed}
    root["root"] = hash_json(root)
    chain, prev = [], root["root"]
    for spec in recipe.stages:
        prev = hash_json([prev, spec.name, spec.config.model_dump()])
        chain.append(prev)
    return root, chain


def manifest(recipe: Recipe, root: dict) -> dict:
    import torch
    import transformers

    return {
        "versions": {"dsc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprints": {**root, "recipe": hash_json({k: v for k, v in recipe.to_dict().items() if k != "output"})},
    }


def run_recipe(recipe: Recipe, output: str | Path | None = None, fresh: bool = False,
               log: logging.Logger | None = None) -> Path:
    """Run every unfinished stage; returns the run directory. Safe to call again to resume."""
    log = log or logging.getLogger("dsc")
    out = RunDir(Path(output) if output else (recipe.base_dir / recipe.output.dir).resolve())
    with out:
        if fresh:
            out.clear()
        out.remove_partial()
        root, chain = fingerprints(recipe)
        start = out.check_resume(chain, [s.name for s in recipe.stages],
                                 [s.config.model_dump() for s in recipe.stages], root)
        write_text(out.path / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_json(out.path / "manifest.json", manifest(recipe, root))
        if start:
            log.info("resuming %s after %d finished stage(s)", out.path, start, extra={"event": "resume", "start": start})
        try:
            _run_stages(recipe, out, start, chain, root, log)
        except KeyboardInterrupt:
            raise RunInterrupted(f"interrupted; finished stages are kept in {out.stages}: rerun to resume") from None
        finally:
            out.remove_partial()
    return out.path


class _Session:
    """Models of one run: the teacher (frozen) and the working model, loaded when first needed."""

    def __init__(self, recipe: Recipe, out: RunDir, root: dict, log: logging.Logger):
        self.recipe, self.out, self.log = recipe, out, log
        self.source = resolve(recipe.teacher, recipe.base_dir)
        self.device = pick_device(recipe.device)
        self.tokenizer = load_tokenizer(self.source, recipe.teacher)
        self.ctx = Context(tokenizer=self.tokenizer, data=None, device=self.device, seed=recipe.seed, log=log,
                           baseline_dir=out.baseline, teacher_loader=self.load_teacher)
        self.ctx.data = DataStore(recipe.data, self.tokenizer, recipe.base_dir, default_cache_dir(recipe),
                                  recipe.seed, root["teacher"], teacher=self.ctx.teacher, log=log)

    def load_teacher(self):
        t0 = time.perf_counter()
        model = load_model(self.source, self.recipe.teacher).to(self.device)
        self.log.info("teacher loaded in %.1fs", time.perf_counter() - t0, extra={"event": "teacher_loaded"})
        return model

    def working_model(self, start: int):
        """The model entering stage `start`: the last finished checkpoint, or the teacher."""
        for i in range(start - 1, -1, -1):
            spec = self.recipe.stages[i]
            if STAGES[spec.name].changes_model:
                return load_checkpoint(self.out.stage_dir(i, spec.name) / "model", dtype="auto").to(self.device)
        return self.ctx.teacher()  # shared until a stage changes it (then the teacher reloads)


def _run_stages(recipe: Recipe, out: RunDir, start: int, chain: list[str], root: dict, log) -> None:
    todo = list(range(start, len(recipe.stages)))
    publish = recipe.output.save_model and (bool(todo) or not (out.model / "dsc_source.json").is_file())
    session = _Session(recipe, out, root, log) if todo or publish else None
    model = session.working_model(start) if todo else None
    for i in todo:
        model = _run_stage(i, recipe, out, chain[i], model, session.ctx, log)
        write_json(out.path / "metrics.json", collect_metrics(out.path))
        write_report(out.path)
    if publish:
        _publish_final(recipe, out, model, session)
    write_json(out.path / "metrics.json", collect_metrics(out.path))
    write_report(out.path)
    log.info("done: %s", out.path, extra={"event": "run_done", "output": str(out.path)})


def _run_stage(i: int, recipe: Recipe, out: RunDir, fingerprint: str, model, ctx: Context, log):
    spec = recipe.stages[i]
    stage = STAGES[spec.name]
    tmp, final = out.tmp_stage_dir(i, spec.name), out.stage_dir(i, spec.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if stage.changes_model:
        ctx.forget_teacher_if(model)  # the stage may edit the model in place: the teacher reloads
    ctx.stage_dir = tmp
    log.info("stage %d/%d: %s", i + 1, len(recipe.stages), spec.name,
             extra={"event": "stage_start", "index": i, "stage": spec.name})
    t0 = time.perf_counter()
    try:
        result = stage.apply(model, spec.config, ctx)
    except DscInputError as exc:  # the stage names a field of its own config: prefix its recipe path
        raise DscInputError(f"{spec.path}.{exc.path}" if exc.path else spec.path, exc.message) from exc
    seconds = time.perf_counter() - t0
    metrics = dict(result.metrics)
    if stage.changes_model:
        save_model(result.model, ctx.tokenizer, tmp / "model")
        metrics["checkpoint_disk_bytes"] = disk_bytes(tmp / "model")
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "stage.json", {"index": i, "name": spec.name, "config": spec.config.model_dump(),
                                    "fingerprint": fingerprint, "seconds": round(seconds, 3),
                                    "changes_model": stage.changes_model,
                                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    replace_dir(tmp, final)
    ctx.stage_dir = None
    log.info("stage %d/%d: %s done in %.1fs", i + 1, len(recipe.stages), spec.name, seconds,
             extra={"event": "stage_done", "index": i, "stage": spec.name, "seconds": seconds})
    return result.model


def _publish_final(recipe: Recipe, out: RunDir, model, session: _Session) -> None:
    """OUT/model: hard links to the last checkpoint when there is one, else the working model."""
    last = [i for i, s in enumerate(recipe.stages) if STAGES[s.name].changes_model]
    tmp = out.path / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if last:
        src = out.stage_dir(last[-1], recipe.stages[last[-1]].name) / "model"
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        origin = str(src.relative_to(out.path))
    else:
        model = model if model is not None else session.working_model(len(recipe.stages))
        save_model(model, session.tokenizer, tmp)
        origin = "teacher (no stage changed the model)"
    write_json(tmp / "dsc_source.json", {"from": origin})
    replace_dir(tmp, out.model)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
