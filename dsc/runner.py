"""`dsc run`: execute a validated recipe in a run directory, resuming after finished stages."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from dsc import __version__, hf, hub, parallel
from dsc.context import Context, DataStore, default_cache_dir, pick_device
from dsc.data.pipeline import tokenizer_fingerprint
from dsc.data.sources import resolve_file, source_fingerprint
from dsc.errors import DscInputError, FieldError, RunInterrupted
from dsc.evaluation import disk_bytes
from dsc.fingerprint import folder_hashes, folder_matches, hash_files, hash_json, read_json, write_json, write_text
from dsc.models import ModelRef, card_facts, fingerprint as model_fingerprint, load_checkpoint, load_model, \
    load_tokenizer, replace_dir, resolve, save_model
from dsc.recipe import Recipe
from dsc.registry import STAGES
from dsc.report import collect_metrics, write_report
from dsc.rundir import RunDir
from dsc.tracking import Tracker, open_tracker


def fingerprints(recipe: Recipe) -> tuple[dict, list[str]]:
    """Root fingerprints (teacher weights, data, seed) and the per-stage chain built on them."""
    source = resolve(recipe.teacher, recipe.base_dir)
    teacher = hash_json([model_fingerprint(source, recipe.teacher), recipe.teacher.model_dump()])
    data = {name: hash_json([source_fingerprint(src, recipe.base_dir, teacher), src.block_size, src.splits])
            for name, src in recipe.data.items()}
    root = {"teacher": teacher, "data": data, "seed": recipe.seed}
    if recipe.student is not None:
        student = resolve(recipe.student, recipe.base_dir, "student.path")
        root["student"] = hash_json([model_fingerprint(student, recipe.student), recipe.student.model_dump()])
    root["root"] = hash_json(root)
    chain, prev = [], root["root"]
    for spec in recipe.stages:
        models = _stage_models(spec, recipe.base_dir)
        # Fields at their defaults stay out: a dsc upgrade that adds a field does not block a resume.
        prev = hash_json([prev, spec.name, spec.config.model_dump(exclude_defaults=True)] + ([models] if models else []))
        chain.append(prev)
    return root, chain


def _stage_models(spec, base_dir: Path) -> dict:
    """Fingerprints of the model folders and files a stage reads (distill.student.path,
    evaluate.tasks.*.path): one edited between a crash and the rerun makes that stage and the ones
    after it run again."""
    out = {}
    for name, path in spec.config.model_refs().items():
        ref = ModelRef(path=path)
        out[name] = model_fingerprint(resolve(ref, base_dir, f"{spec.path}.{name}"), ref)
    for name, path in spec.config.file_refs().items():
        out[name] = hash_files([resolve_file(path, base_dir)])
    return out


def versions() -> dict:
    import torch

    return {"dsc": __version__, "torch": torch.__version__, "transformers": hf.version(),
            "python": platform.python_version()}


def update_manifest(out: RunDir, recipe: Recipe, root: dict, start: int, log) -> None:
    """manifest.json keeps the first run's facts and appends one entry per (re)start."""
    path = out.path / "manifest.json"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    current = versions()
    old = out.read_manifest() if start else None
    if old and old["versions"] != current:
        log.warning("resuming with other versions than the finished stages used: %s -> %s", old["versions"],
                    current, extra={"event": "version_change"})
    manifest = {
        "versions": current,
        "created": old["created"] if old else now,
        "fingerprints": {**root, "recipe": hash_json({k: v for k, v in recipe.to_dict().items() if k != "output"})},
        "starts": (old.get("starts", []) if old else []) + [{"at": now, "from_stage": start, "versions": current}],
    }
    write_json(path, manifest)


def run_recipe(recipe: Recipe, output: str | Path | None = None, fresh: bool = False,
               log: logging.Logger | None = None) -> Path:
    """Run every unfinished stage; returns the run directory. Safe to call again to resume."""
    log = log or logging.getLogger("dsc")
    out = RunDir(Path(output) if output else (recipe.base_dir / recipe.output.dir).resolve())
    parallel.init_from_env(pick_device(recipe.device))
    if parallel.rank() > 0:
        return _follow(recipe, out, log)
    with out:
        if fresh:
            out.clear()
        out.remove_partial()
        root, chain = fingerprints(recipe)
        start = out.check_resume(chain, [s.name for s in recipe.stages],
                                 [s.config.model_dump() for s in recipe.stages], root, log)
        out.keep_work({out.work_dir(i, s.name, chain[i]) for i, s in enumerate(recipe.stages) if i >= start})
        write_text(out.path / "recipe.yaml", recipe.to_yaml())
        update_manifest(out, recipe, root, start, log)
        if start:
            log.info("resuming %s after %d finished stage(s)", out.path, start, extra={"event": "resume", "start": start})
        tracker = open_tracker(recipe.tracking, recipe.base_dir, out.path)
        status = "FAILED"
        try:
            tracker.start({"recipe": recipe.to_dict(), "versions": versions()}, recipe.to_yaml())
            for i in range(start):  # finished before a kill, perhaps before they were logged
                _track_stage(tracker, out, recipe, i)
            _run_stages(recipe, out, start, chain, root, log, tracker)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise RunInterrupted(f"interrupted; finished stages are kept in {out.stages}: rerun to resume") from None
        finally:
            tracker.close(status)
            out.remove_partial()
    parallel.broadcast(None)  # release the other processes (a failure ends them through the launcher)
    return out.path


def _follow(recipe: Recipe, out: RunDir, log: logging.Logger) -> Path:
    """Ranks > 0 under torchrun: rank 0 owns OUT and runs every stage; the others join the
    distributed ones (training), starting from the checkpoint rank 0 just finished."""
    root, chain = fingerprints(recipe)
    session = None
    while (i := parallel.broadcast(None)) is not None:
        spec = recipe.stages[i]
        session = session or _Session(recipe, out, root, log)
        model = session.working_model(i)
        session.ctx.forget_teacher_if(model)
        session.ctx.work_dir = out.work_dir(i, spec.name, chain[i])
        STAGES[spec.name].apply(model, spec.config, session.ctx)
        del model
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
        if self.source.kind == "gguf":
            self.ctx.teacher_file = Path(self.source.location) / self.source.gguf_file
        self.ctx.provenance = {"name": out.path.name, "teacher": recipe.teacher.path, "recipe": recipe.to_yaml()}
        # Token streams are kept in OUT/data too: a resumed run reads the very tokens it started with
        # (teacher samples may differ on other hardware), whatever happened to the shared cache.
        caches = (out.data, default_cache_dir(recipe.cache_dir, recipe.base_dir))
        self.ctx.data = DataStore(recipe.data, self.tokenizer, recipe.base_dir, caches, recipe.seed, root["teacher"],
                                  teacher=self.ctx.teacher, log=log)

    def load_student(self):
        """The recipe's `student`, after checking it reads the teacher's tokens."""
        source = resolve(self.recipe.student, self.recipe.base_dir, "student.path")
        theirs = tokenizer_fingerprint(load_tokenizer(source, self.recipe.student, "student.path"))
        if theirs != tokenizer_fingerprint(self.tokenizer):
            raise DscInputError("student", "its tokenizer differs from the teacher's: distillation compares "
                                "next-token distributions over one vocabulary. Choose a student of the teacher's "
                                "family (same tokenizer), or leave `student` out to start from the teacher")
        return load_model(source, self.recipe.student, "student.path").to(self.device)

    def load_teacher(self):
        t0 = time.perf_counter()
        model = load_model(self.source, self.recipe.teacher).to(self.device)
        self.log.info("teacher loaded in %.1fs", time.perf_counter() - t0, extra={"event": "teacher_loaded"})
        return model

    def working_model(self, start: int):
        """The model entering stage `start`: the last finished checkpoint, else the student, else
        the teacher."""
        last = last_checkpoint(self.recipe, start)
        if last is None and self.recipe.student is not None:
            return self.load_student()
        if last is None:
            return self.ctx.teacher()  # shared until a stage changes it (then the teacher reloads)
        return self.checkpoint(last)

    def checkpoint(self, i: int):
        """Load stage i's checkpoint, after checking its files are the ones the stage wrote."""
        return load_checkpoint(verified_checkpoint(self.out, self.recipe, i), dtype="auto").to(self.device)


def verified_checkpoint(out: RunDir, recipe: Recipe, i: int) -> Path:
    """Stage i's model folder, refused if its files changed (sha256) since the stage wrote them;
    hashed once a run (a folder this run wrote or already verified is not read again)."""
    folder = out.stage_dir(i, recipe.stages[i].name)
    if folder.name not in out.sound:
        problem = folder_matches(folder / "model", read_json(folder / "stage.json")["files"])
        if problem:
            raise DscInputError("output", f"{folder / 'model'} changed since stage {i} wrote it ({problem}): rerun "
                                "to rebuild it from the stage before, or with --fresh to start over")
        out.sound.add(folder.name)
    return folder / "model"


def last_checkpoint(recipe: Recipe, end: int) -> int | None:
    """Index of the last model-changing stage before `end`."""
    return next((i for i in range(end - 1, -1, -1) if STAGES[recipe.stages[i].name].changes_model), None)


def _track_stage(tracker: Tracker, out: RunDir, recipe: Recipe, i: int) -> None:
    folder = out.stage_dir(i, recipe.stages[i].name)
    tracker.stage_done(out.path, i, folder.name, read_json(folder / "metrics.json"), recipe.stages[i].name == "evaluate")


def _run_stages(recipe: Recipe, out: RunDir, start: int, chain: list[str], root: dict, log,
                tracker: Tracker) -> None:
    todo = sorted(set(out.retry) | set(range(start, len(recipe.stages))))  # skipped stages are tried again
    last = last_checkpoint(recipe, len(recipe.stages))
    first = "teacher" if recipe.student is None else "student"
    origin = {"from": first if last is None else f"stages/{out.stage_dir(last, recipe.stages[last].name).name}",
              "fingerprint": root["root"] if last is None else chain[last]}
    if not recipe.output.save_model:
        shutil.rmtree(out.model, ignore_errors=True)  # never leave a model that is not this recipe's
    session = _Session(recipe, out, root, log) if todo else None
    if session is not None:
        session.ctx.tracker = tracker
    model, prev = None, None
    for i in todo:
        if prev is None or any(STAGES[recipe.stages[k].name].changes_model for k in range(prev + 1, i)):
            del model
            model = session.working_model(i)  # a retried stage, or the first after finished ones
        model = _run_stage(i, recipe, out, chain[i], model, session, log)
        prev = i
        _track_stage(tracker, out, recipe, i)
        write_json(out.path / "metrics.json", collect_metrics(out.path))
        write_report(out.path)
    # Decided once every stage is done (a rebuilt checkpoint is a new origin), before `done`.
    if last is not None:
        origin["files"] = read_json(out.stage_dir(last, recipe.stages[last].name) / "stage.json")["files"]
    publish_artifacts(recipe, out)
    problem = published_problem(out, origin) if recipe.output.save_model else None
    if problem is not None:
        if problem.startswith("damaged"):
            log.warning("%s is %s: publishing it again from %s", out.model, problem, origin["from"],
                        extra={"event": "damaged", "path": str(out.model), "problem": problem})
        session = session or (_Session(recipe, out, root, log) if last is None else None)  # the teacher's copy
        _publish_final(recipe, out, model, session, last, origin)
    write_json(out.path / "metrics.json", collect_metrics(out.path))
    write_report(out.path)
    log.info("done: %s", out.path, extra={"event": "run_done", "output": str(out.path)})


def _run_stage(i: int, recipe: Recipe, out: RunDir, fingerprint: str, model, session: _Session, log):
    spec, ctx = recipe.stages[i], session.ctx
    stage = STAGES[spec.name]
    tmp, final = out.tmp_stage_dir(i, spec.name), out.stage_dir(i, spec.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if stage.changes_model and spec.config.edits_input:
        ctx.forget_teacher_if(model)  # the stage may edit the model in place: the teacher reloads
    work = out.work_dir(i, spec.name, fingerprint)
    ctx.stage_dir, ctx.work_dir, ctx.scope = tmp, work, final.name
    ctx.artifacts = finished_artifacts(recipe, out, i)
    ctx.artifact_dir = tmp / ARTIFACTS if stage.artifact else None
    ctx.provenance["stage"] = f"stages[{i}] of {len(recipe.stages)}: {spec.name}"
    log.info("stage %d/%d: %s", i + 1, len(recipe.stages), spec.name,
             extra={"event": "stage_start", "index": i, "stage": spec.name})
    if stage.distributed and parallel.active():
        ctx.data[getattr(spec.config, "data", None) or ctx.data.default()]  # in OUT/data before the others read it
        parallel.broadcast(i)  # the other processes join this stage
    t0 = time.perf_counter()
    try:
        result = stage.apply(model, spec.config, ctx)
    except FieldError as exc:  # the stage names a field of its own config: prefix its recipe path
        raise DscInputError(f"{spec.path}.{exc.path}", exc.message) from exc
    finally:
        ctx.stage_dir = ctx.work_dir = ctx.artifact_dir = None
    seconds = time.perf_counter() - t0
    metrics, info = dict(result.metrics), {"files": None}
    if stage.changes_model:
        save_model(result.model, ctx.tokenizer, tmp / "model")
        write_card(recipe, out, tmp / "model", i, final=False)
        metrics["checkpoint_disk_bytes"] = disk_bytes(tmp / "model")
        info["files"] = folder_hashes(tmp / "model")
    if stage.artifact:
        info["artifacts"] = folder_hashes(tmp / ARTIFACTS)
        metrics["artifacts"] = {name: size for name, (size, _) in info["artifacts"].items()}
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "stage.json", {"index": i, "name": spec.name, "config": spec.config.model_dump(),
                                    "fingerprint": fingerprint, "seconds": round(seconds, 3), **info,
                                    "dsc_version": __version__,
                                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    replace_dir(tmp, final)
    out.sound.add(final.name)  # just hashed into its stage.json: loading it next needs no second read
    shutil.rmtree(work, ignore_errors=True)  # finished: nothing to resume
    log.info("stage %d/%d: %s done in %.1fs", i + 1, len(recipe.stages), spec.name, seconds,
             extra={"event": "stage_done", "index": i, "stage": spec.name, "seconds": seconds})
    if not stage.changes_model:
        return result.model
    # Continue from the checkpoint as saved, not the in-memory object: what later stages see and
    # measure is exactly what a resumed run (or a user) loads.
    del result, model
    return session.checkpoint(i)


def _publish_final(recipe: Recipe, out: RunDir, model, session: _Session, last: int | None, origin: dict) -> None:
    """OUT/model: a copy of the last checkpoint when there is one, else the teacher. A copy, not
    hard links: a user editing OUT/model in place must not change what a resume starts from."""
    tmp = out.path / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if last is not None:
        shutil.copytree(verified_checkpoint(out, recipe, last), tmp)
    else:
        save_model(model if model is not None else session.working_model(0), session.tokenizer, tmp)
    write_card(recipe, out, tmp, last, final=True)
    write_json(tmp / SOURCE, {**origin, "published": folder_hashes(tmp)})
    replace_dir(tmp, out.model)


ARTIFACTS = "export"  # in an artifact stage's folder, and OUT/export/: the files it wrote


def finished_artifacts(recipe: Recipe, out: RunDir, end: int) -> list[dict]:
    """The files of the artifact stages before `end` (all finished): {index, format, path}."""
    found = []
    for j, spec in enumerate(recipe.stages[:end]):
        if STAGES[spec.name].artifact:
            folder = out.stage_dir(j, spec.name) / ARTIFACTS
            found += [{"index": j, "format": spec.config.format, "path": folder / name}
                      for name in sorted(read_json(out.stage_dir(j, spec.name) / "stage.json")["artifacts"])]
    return found


def publish_artifacts(recipe: Recipe, out: RunDir) -> None:
    """OUT/export/: every artifact stage's files, hard links to the stage's own (verified before
    each resume, so a published file edited in place is rebuilt, never trusted); removed when the
    recipe has no artifact stage."""
    files = finished_artifacts(recipe, out, len(recipe.stages))
    dest = out.path / ARTIFACTS
    if not files:
        shutil.rmtree(dest, ignore_errors=True)
        return
    if dest.is_dir() and sorted(p.name for p in dest.iterdir()) == sorted(f["path"].name for f in files) and \
            all(os.path.samefile(dest / f["path"].name, f["path"]) for f in files):
        return  # already these very files
    tmp = out.path / f".tmp-{ARTIFACTS}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files:
        try:
            os.link(f["path"], tmp / f["path"].name)
        except OSError:  # another filesystem, or links refused: a copy
            shutil.copy2(f["path"], tmp / f["path"].name)
    replace_dir(tmp, dest)


SOURCE = "dsc_source.json"  # in OUT/model: which checkpoint it is a copy of, and its files' sha256


def published_problem(out: RunDir, origin: dict) -> str | None:
    """Why OUT/model must be (re)published: missing, from another stage, or its files changed
    since dsc wrote them (checked before every `done`); None when it is sound."""
    if not (out.model / SOURCE).is_file():
        return "missing"
    try:
        marker = read_json(out.model / SOURCE)
        if {k: marker.get(k) for k in origin} != origin:
            return "stale: not the last checkpoint's copy"
        problem = folder_matches(out.model, marker["published"], skip=(SOURCE,))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "damaged: its dsc_source.json is unreadable"
    return f"damaged: {problem}" if problem else None


def write_card(recipe: Recipe, out: RunDir, folder: Path, upto: int | None, final: bool) -> Path:
    """The model card (README.md) of the model in `folder`, made by the stages up to `upto` (None:
    the teacher or student itself), with the evaluations finished so far. `final`: OUT/model (named
    after the run), else stage `upto`'s checkpoint."""
    metrics = collect_metrics(out.path)
    applied = [{"index": i, "name": s.name, "config": s.config.model_dump(exclude_defaults=True)}
               for i, s in enumerate(recipe.stages) if upto is not None and i <= upto and STAGES[s.name].changes_model]
    start = recipe.student or recipe.teacher
    # Rows that measured this very model: evaluate stages after its last change (the teacher's row
    # when no stage changed it).
    own = [(r, t) for t in metrics["evaluations"] for r in t["rows"]
           if (r["stage"] is not None and r["stage"] > (-1 if upto is None else upto))
           or (upto is None and recipe.student is None and r["label"] == "teacher")]
    title = out.path.name if final else f"{out.path.name}: stage {upto} ({recipe.stages[upto].name})"
    text = hub.card_text(title=title, teacher=card_facts(start, resolve(start, recipe.base_dir)), stages=applied,
                         tables=metrics["evaluations"], own_rows=own, quant=hub.quantization(folder),
                         recipe_yaml=recipe.to_yaml(), version=__version__)
    return hub.write_card(folder, text)

