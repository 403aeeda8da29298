"""The `dsc` command line. Exit codes: 0 done, 1 failure, 2 bad input, 3 interrupted, 4 the Hub
could not be reached or refused."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from dsc.errors import DscError, ExitCode

EPILOG = ("exit codes: 0 done, 1 failure, 2 bad input (recipe, paths, model, run directory), 3 interrupted (rerun to "
          "resume), 4 the Hub could not be reached or refused (dsc push: retry later)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsc", description="Compress a Hugging Face causal LM into a Lite model.",
                                epilog=EPILOG)
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one object per line, for jobs")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (resumes after finished stages)", epilog=EPILOG)
    run.add_argument("recipe")
    run.add_argument("-o", "--output", help="run directory (overrides the recipe's output)")
    run.add_argument("--fresh", action="store_true", help="discard a previous run in the output and start over")
    val = sub.add_parser("validate", help="validate recipes without loading any model")
    val.add_argument("recipes", nargs="+")
    st = sub.add_parser("stages", help="list stages with their fields, types, defaults and help")
    st.add_argument("name", nargs="?")
    ev = sub.add_parser("eval", help="evaluate one model (perplexity, size, speed, memory)")
    ev.add_argument("model", help="HF directory, .gguf file, hub id, or 'default'")
    ev.add_argument("--data", default="generated", help="text/.jsonl/.parquet file, or 'generated' (sampled from the model)")
    ev.add_argument("--field", default="text", help="JSON key or column holding the text")
    ev.add_argument("--line-join", default=None, help="text files: drop empty lines, join with this (WikiText: '\\n\\n')")
    ev.add_argument("--max-tokens", type=int, default=None, help="read only the first N tokens of the data")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an evaluate field (see `dsc stages evaluate`), e.g. --set context_length=1024")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument("--json", dest="json_out", help="also write the metrics to this file")
    rep = sub.add_parser("report", help="render report.md (and --html) again from a run directory")
    rep.add_argument("output")
    rep.add_argument("--html", action="store_true")
    push = sub.add_parser("push", help="upload OUT/model with its model card to a Hugging Face Hub repo", epilog=EPILOG)
    push.add_argument("output", help="run directory (its model/ folder is pushed) or a model folder")
    push.add_argument("repo_id", help="Hub model repo, e.g. me/smollm2-lite (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dsc.log import setup_logging

    # Under torchrun only rank 0 reports progress; the other processes report problems.
    level = args.log_level if int(os.environ.get("RANK", "0")) == 0 else "warning"
    log = setup_logging(args.log_format, level)
    code = _run_command(args, log)
    if code == ExitCode.OK and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dsc import parallel

        parallel.exit_process(code)  # a failure is left to the launcher, which stops the others
    return code


def _run_command(args, log) -> int:
    previous = signal.signal(signal.SIGTERM, _sigterm)  # Kubernetes stops pods with SIGTERM
    try:
        return int(COMMANDS[args.command](args, log) or ExitCode.OK)
    except DscError as exc:
        log.error("%s", exc, extra={"event": "error", "kind": type(exc).__name__, "exit_code": int(exc.exit_code)})
        return int(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted: rerun the same command to resume", extra={"event": "error", "exit_code": 3})
        return int(ExitCode.INTERRUPTED)
    except OSError as exc:  # a path the filesystem refuses, a read-only or full disk: the user's to fix
        from dsc.paths import USER_ERRNOS, refused

        if exc.errno not in USER_ERRNOS or exc.filename is None:
            log.exception("failed", extra={"event": "error", "exit_code": 1})
            return int(ExitCode.FAILURE)
        err = refused(exc, "path")
        log.error("%s", err, extra={"event": "error", "kind": "DscInputError", "exit_code": int(err.exit_code),
                                    "path": str(exc.filename)})
        return int(err.exit_code)
    except Exception:  # noqa: BLE001 - the one place that turns a crash into exit code 1
        log.exception("failed", extra={"event": "error", "exit_code": 1})
        return int(ExitCode.FAILURE)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args, log) -> int:
    from dsc.recipe import load_recipe
    from dsc.runner import run_recipe

    recipe = load_recipe(args.recipe, output=args.output)  # -o is validated like the recipe's own output
    out = run_recipe(recipe, fresh=args.fresh, log=log)
    _print(args, {"output": str(out), "report": str(out / "report.md"),
                  "model": str(out / "model") if (out / "model").is_dir() else None}, str(out / "report.md"))
    return 0


def _print(args, obj, text: str) -> None:
    """A command's result on stdout: one JSON object (--log-format json) or plain text."""
    print(json.dumps(obj, default=str) if args.log_format == "json" else text, flush=True)


def cmd_validate(args, log) -> int:
    from dsc.errors import DscInputError, RecipeError
    from dsc.recipe import load_recipe

    bad = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
            _print(args, {"recipe": path, "ok": True, "stages": [s.name for s in recipe.stages]},
                   f"{path}: ok ({len(recipe.stages)} stages: {', '.join(s.name for s in recipe.stages)})")
        except DscInputError as exc:
            bad += 1
            problems = exc.problems if isinstance(exc, RecipeError) else [exc]
            if args.log_format == "json":
                _print(args, {"recipe": path, "ok": False,
                              "problems": [{"path": p.path, "message": p.message} for p in problems]}, "")
            else:
                print(f"{path}: invalid\n" + "\n".join(f"  {line}" for line in str(exc).splitlines()), file=sys.stderr)
    return ExitCode.BAD_INPUT if bad else 0


def cmd_stages(args, log) -> int:
    from dsc.config import describe_fields
    from dsc.errors import DscInputError, did_you_mean
    from dsc.registry import STAGES

    if args.name and args.name not in STAGES:
        raise DscInputError("stage", f"unknown stage {args.name!r}{did_you_mean(args.name, STAGES)}")
    if args.log_format == "json":
        for name, stage in STAGES.items():
            if args.name in (None, name):
                fields = [{**{k: v for k, v in f.items() if k != "nested"},
                           "entries": {cls.__name__: [{k: v for k, v in g.items() if k != "nested"}
                                                      for g in describe_fields(cls)] for cls in f["nested"]}}
                          for f in describe_fields(stage.config)]
                _print(args, {"stage": name, "summary": stage.summary, "fields": fields}, "")
        return 0
    for name, stage in STAGES.items():
        if args.name in (None, name):
            print(f"{name}: {stage.summary}")
            for f in describe_fields(stage.config):
                print(f"  {f['name']:<18} {f['type']:<24} {f['default']:<14} {f['help']}")
                for cls in f["nested"]:
                    print(f"    {f['name']} entry: {cls.__name__} — {(cls.__doc__ or '').strip()}")
                    for g in describe_fields(cls):
                        print(f"      {g['name']:<16} {g['type']:<22} {g['default']:<14} {g['help']}")
            print()
    return 0


def cmd_eval(args, log) -> int:
    from dsc import paths
    from dsc.errors import DscInputError
    from dsc.evaluate_cli import evaluate_model_cli

    if args.json_out:  # checked before the work, not after it
        target = Path(args.json_out)
        if paths.kind(target, "--json") == "dir" or paths.kind(target.parent, "--json") not in ("dir",):
            raise DscInputError("--json", f"cannot write {target}: its folder must exist and it must not be a folder")
    metrics = evaluate_model_cli(args, log)
    text = json.dumps(metrics, indent=2, default=str)
    _print(args, metrics, text)
    if args.json_out:
        try:
            Path(args.json_out).write_text(text + "\n")
        except OSError as exc:
            raise paths.refused(exc, "--json", args.json_out) from None
    return 0


def cmd_report(args, log) -> int:
    from dsc.errors import DscInputError
    from dsc.fingerprint import write_json
    from dsc.report import collect_metrics, write_report

    run = Path(args.output)
    if not (run / "stages").is_dir():
        raise DscInputError("output", f"{run} is not a dsc run directory (no stages/ folder)")
    write_json(run / "metrics.json", collect_metrics(run))
    report = write_report(run, html_too=args.html)
    _print(args, {"report": str(report)}, str(report))
    return 0


def cmd_push(args, log) -> int:
    from dsc import hub

    folder = Path(args.output)
    folder = folder / "model" if (folder / "model").is_dir() else folder
    url = hub.push(folder, args.repo_id, private=args.private)
    log.info("pushed %s to %s", folder, url, extra={"event": "pushed", "repo_id": args.repo_id, "url": url})
    _print(args, {"url": url}, url)
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "stages": cmd_stages, "eval": cmd_eval, "report": cmd_report,
            "push": cmd_push}

if __name__ == "__main__":
    sys.exit(main())
