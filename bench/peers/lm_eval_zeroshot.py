# Run by bench/bench_zeroshot.py as a subprocess, with /work/venvs/lmeval/bin/python (lm-eval
# 0.4.13, transformers 5.23.0, torch 2.13.0+cpu, datasets 5.2.0); the last stdout line is one JSON
# object. No dsc import: dsc is not installed in that venv.
"""lm-evaluation-harness on local files: the peer of dsc.zeroshot.

    python bench/peers/lm_eval_zeroshot.py --model DIR --limit 200 --batch-size 8 \
        --arc ARC.jsonl --piqa valid.jsonl --piqa-labels valid-labels.lst --lambada lambada_test.jsonl

The hub is unreachable, so each task is a YAML written to a temporary folder and loaded with
TaskManager(include_path=...) (what `lm_eval --include_path` does), its data read by the `json`
builder from the local file (`dataset_path: json`, `dataset_kwargs.data_files`). The prompts,
targets and metrics are copied from lm-eval's own arc_easy.yaml, piqa.yaml and
lambada_openai.yaml; only the data source differs (ARC: the shared file's `query` already holds
"Question: ..."; PIQA: the labels are merged into the JSONL first, as `label`). Runs
`simple_evaluate` on one HFLM (`--model hf`: float32, CPU, --batch-size) with `log_samples=True`
and prints per task the aggregate metrics, the seconds (model loading excluded), and per document
acc / acc_norm and each request's (loglik, is_greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MC_METRICS = """metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""

YAMLS = {
    "arc_easy": """task: dsc_arc_easy
dataset_path: json
dataset_kwargs: {data_files: {test: "PATH"}}
output_type: multiple_choice
test_split: test
doc_to_text: "{{query}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: "{{choices}}"
""" + MC_METRICS,
    "piqa": """task: dsc_piqa
dataset_path: json
dataset_kwargs: {data_files: {test: "PATH"}}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
""" + MC_METRICS,
    "lambada": """task: dsc_lambada
dataset_path: json
dataset_kwargs: {data_files: {test: "PATH"}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
}


def merged_piqa(path: str, labels: str, folder: Path) -> str:
    """PIQA's valid.jsonl with the label of each line (valid-labels.lst) added as `label`."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    gold = [int(x) for x in Path(labels).read_text().split()]
    if len(rows) != len(gold):
        raise SystemExit(f"{path}: {len(rows)} items but {labels}: {len(gold)} labels")
    out = folder / "piqa_merged.jsonl"
    out.write_text("".join(json.dumps({**r, "label": g}) + "\n" for r, g in zip(rows, gold)), encoding="utf-8")
    return str(out)


def run_task(lm, name: str, path: str, folder: Path, args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir = folder / name
    task_dir.mkdir()
    (task_dir / f"{name}.yaml").write_text(YAMLS[name].replace("PATH", path), encoding="utf-8")
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm,
                                  tasks=[f"dsc_{name}"], task_manager=TaskManager(include_path=str(task_dir)),
                                  limit=args.limit, log_samples=True, num_fewshot=0)
    seconds = time.perf_counter() - t0
    agg = res["results"][f"dsc_{name}"]
    samples = sorted(res["samples"][f"dsc_{name}"], key=lambda s: s["doc_id"])
    return {
        "seconds": seconds,
        "acc": agg.get("acc,none"), "acc_norm": agg.get("acc_norm,none"), "perplexity": agg.get("perplexity,none"),
        "acc_stderr": agg.get("acc_stderr,none"),
        "items": [{"doc_id": s["doc_id"], "acc": s.get("acc"), "acc_norm": s.get("acc_norm"),
                   "resps": [[float(r[0][0]), bool(r[0][1])] for r in s["resps"]]} for s in samples],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--arc")
    ap.add_argument("--piqa")
    ap.add_argument("--piqa-labels")
    ap.add_argument("--lambada")
    args = ap.parse_args()
    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    out = {"versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "transformers": transformers.__version__,
                        "torch": torch.__version__}, "threads": torch.get_num_threads(), "tasks": {}}
    t0 = time.perf_counter()
    lm = HFLM(pretrained=args.model, dtype="float32", batch_size=args.batch_size, device="cpu")
    out["load_seconds"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {"arc_easy": args.arc, "lambada": args.lambada,
                 "piqa": merged_piqa(args.piqa, args.piqa_labels, folder) if args.piqa else None}
        for name, path in paths.items():
            if path:
                print(f"lm-eval: {name}", file=sys.stderr, flush=True)
                out["tasks"][name] = run_task(lm, name, str(Path(path).resolve()), folder, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
