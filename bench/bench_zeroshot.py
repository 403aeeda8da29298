"""Zero-shot accuracy: dsc.zeroshot against lm-evaluation-harness on the same model and items.

Scores ARC-Easy, PIQA and LAMBADA (OpenAI) from ../shared/data with dsc's scorer (what the
`evaluate` stage's `tasks` run) and, with `--peer lm-eval`, with lm-eval 0.4 itself
(bench/peers/lm_eval_zeroshot.py in /work/venvs/lmeval: `--model hf`, task YAMLs over the same
local files). Prints one table: per task the items, acc / acc_norm of each, the item-level
agreement (acc and acc_norm equal per item), the largest log-likelihood difference of any request,
and the seconds each spent scoring (model loading excluded). `--json` writes the numbers.

    python bench/bench_zeroshot.py --limit 200 --peer lm-eval
    python bench/bench_zeroshot.py --model ../shared/models/stories260K --limit 50

The default model is SmolLM2-135M-Instruct (the embedded teacher) saved once as a plain float32
Hugging Face folder in ~/.cache/dsc/smollm2-plain, so lm-eval loads the very same weights and
tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from dsc.models import ModelRef, load_model, load_tokenizer, resolve, save_model  # noqa: E402
from dsc.zeroshot import LambadaTask, MultipleChoiceTask, PiqaTask, load_items, score_items, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PLAIN = Path(os.environ.get("DSC_CACHE_DIR", Path.home() / ".cache" / "dsc")) / "smollm2-plain"
VENVS = Path(os.environ.get("DSC_PEER_VENVS", "/work/venvs"))


def plain_model(model: str) -> Path:
    """A local HF folder for `model`; 'default' is saved once from the embedded GGUF."""
    if model != "default":
        return Path(model).resolve()
    if not (PLAIN / "config.json").is_file():
        ref = ModelRef(path="default")
        source = resolve(ref, Path.cwd())
        save_model(load_model(source, ref), load_tokenizer(source, ref), PLAIN)
    return PLAIN


def tasks(limit: int, batch_size: int) -> dict:
    common = {"limit": limit, "batch_size": batch_size}
    return {"arc_easy": MultipleChoiceTask(path=str(DATA / "arc_easy" / "arc_easy.jsonl"), **common),
            "piqa": PiqaTask(path=str(DATA / "piqa" / "valid.jsonl"), **common),
            "lambada": LambadaTask(path=str(DATA / "lambada_openai" / "lambada_test.jsonl"), **common)}


def run_dsc(folder: Path, todo: dict) -> dict:
    ref = ModelRef(path=str(folder))
    source = resolve(ref, Path.cwd())
    tok, model = load_tokenizer(source, ref), load_model(source, ref)
    out = {}
    for name, task in todo.items():
        items, _ = load_items(task, Path.cwd(), name)
        t0 = time.perf_counter()
        scores = score_items(model, tok, task, items)
        out[name] = {**summarize(task, scores), "seconds": time.perf_counter() - t0, "scores": scores}
    return out


def run_peer(folder: Path, todo: dict, limit: int, batch_size: int) -> dict:
    python = VENVS / "lmeval" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} not found: create the venv (see docs/benchmarks.md, zero-shot section)")
    piqa = todo["piqa"]
    cmd = [str(python), str(ROOT / "bench" / "peers" / "lm_eval_zeroshot.py"), "--model", str(folder),
           "--limit", str(limit), "--batch-size", str(batch_size), "--arc", todo["arc_easy"].path,
           "--piqa", piqa.path, "--piqa-labels", piqa.labels_path(), "--lambada", todo["lambada"].path]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"lm-eval failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(ours: dict, theirs: dict) -> dict:
    """Item-level agreement (acc and acc_norm equal per item) and the largest |Δ loglik|."""
    agree, dll, greedy = 0, 0.0, 0
    for s, t in zip(ours["scores"], theirs["items"], strict=True):
        acc = float(s["pred"] == s["gold"]) if t["acc_norm"] is not None else float(s["greedy"][0])
        norm = float(s["pred_norm"] == s["gold"]) if t["acc_norm"] is not None else None
        agree += acc == float(t["acc"]) and norm == t["acc_norm"]
        for ll, g, (tll, tg) in zip(s["loglik"], s["greedy"], t["resps"], strict=True):
            dll, greedy = max(dll, abs(ll - tll)), greedy + (g != tg)
    return {"agreement": agree / len(ours["scores"]), "max_abs_dloglik": dll, "greedy_mismatches": greedy}


def fmt(x, digits=4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--peer", choices=["lm-eval"], default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = plain_model(args.model)
    todo = tasks(args.limit, args.batch_size)
    ours = run_dsc(folder, todo)
    peer = run_peer(folder, todo, args.limit, args.batch_size) if args.peer else None
    print(f"# {folder.name}, limit {args.limit}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"{platform.machine()}, torch {torch.__version__}, {date.today()}")
    if peer:
        print(f"# lm-eval {peer['versions']['lm_eval']} (transformers {peer['versions']['transformers']}, "
              f"{peer['threads']} thread(s))")
    print("| task | items | dsc acc | dsc acc_norm | lm-eval acc | lm-eval acc_norm | item agreement "
          "| max abs Δ loglik | dsc s | lm-eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, r in ours.items():
        t = peer["tasks"][name] if peer else None
        cmp = compare(r, t) if t else {}
        norm = fmt(r["acc_norm"]) if r["acc_norm"] is not None else f"ppl {r['perplexity']:.3f}"
        tnorm = "–" if not t else fmt(t["acc_norm"]) if t["acc_norm"] is not None else f"ppl {t['perplexity']:.3f}"
        print(f"| {name} | {r['items']} | {fmt(r['acc'])} | {norm} | {fmt(t and t['acc'])} | {tnorm} "
              f"| {fmt(cmp.get('agreement'), 3)} | {fmt(cmp.get('max_abs_dloglik'), 6)} | {r['seconds']:.1f} "
              f"| {fmt(t and t['seconds'], 1)} |")
        rows[name] = {"dsc": {k: v for k, v in r.items() if k != "scores"},
                      "lm_eval": {k: v for k, v in t.items() if k != "items"} if t else None, **cmp}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
