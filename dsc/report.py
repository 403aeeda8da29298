"""metrics.json, the selection matrix (report.md, report.html) and its plots, rebuilt from a run
directory. The report is built once as a list of blocks and rendered to Markdown and HTML, so
both always say the same thing."""
from __future__ import annotations

import html
from pathlib import Path

from dsc.fingerprint import hash_json, read_json, write_text

PLOTS = ("quality_vs_size.png", "quality_vs_speed.png")
COLUMNS = [  # (header, key in a metrics row, format): the size / speed / memory side of the matrix
    ("params", "params", "{:,}"),
    ("non-emb params", "params_non_embedding", "{:,}"),
    ("weights MB", "weight_bytes", "mb"),
    ("perplexity", "perplexity", "{:.4f}"),
    ("ppl vs teacher", "ppl_ratio", "{:+.2%}"),
]
SPEED_COLUMNS = [
    ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("decode vs teacher", "decode_speedup", "{:.2f}×"),
    ("peak mem MB", "peak_memory_bytes", "mb"),
]
RETAINED = ("quality retained", "quality_retained", "{:.1%}")
RETAINED_NOTE = ("Quality retained: the mean over the zero-shot tasks of the model's accuracy (`acc`) over the "
                 "teacher's (– for a stage evaluated without them); in a run without zero-shot tasks, the "
                 "teacher's perplexity over the model's.")


def collect_metrics(run: Path) -> dict:
    """Every finished stage's metrics, in order, plus the evaluation tables."""
    stages = []
    for d in sorted((Path(run) / "stages").glob("[0-9]*")):
        if (d / "stage.json").is_file():
            try:
                info = read_json(d / "stage.json")
                stages.append({"index": info["index"], "name": info["name"], "folder": d.name,
                               "seconds": info["seconds"], "metrics": read_json(d / "metrics.json")})
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged stage (the next `dsc run` rebuilds it) is left out of the report
    return {"stages": stages, "evaluations": evaluation_tables(stages)}


def evaluation_tables(stages: list[dict]) -> list[dict]:
    """One table per perplexity protocol: the teacher, then each evaluate stage under it, with what
    it gained and lost against the teacher. Zero-shot tasks are columns (a stage that ran fewer
    tasks leaves its cells empty)."""
    tables: dict[str, dict] = {}
    for s in stages:
        m = s["metrics"]
        if s["name"] != "evaluate" or "model" not in m:
            continue  # not an evaluation, or one skipped (its metrics say why)
        proto = m["model"]["protocol"]
        table = tables.setdefault(hash_json(proto), {"protocol": proto, "tasks": [], "rows": []})
        table["tasks"] += [t for t in m["model"].get("zero_shot", {}) if t not in table["tasks"]]
        after = [p["name"] for p in stages if p["index"] < s["index"] and _changes_model(p["name"])]
        if "teacher" in m and "teacher" not in table:
            table["teacher"] = m["teacher"]  # the row shown: every ratio of this table is against it
            table["rows"].insert(0, _row("teacher", None, m["teacher"], m["teacher"]))
        if m["model"] == m.get("teacher"):
            continue  # the teacher itself, measured by this stage: its row is the teacher's
        label = f"stages[{s['index']}] after {' → '.join(after)}" if after else f"stages[{s['index']}] (unchanged)"
        table["rows"].append(_row(label, s["index"], m["model"], table.get("teacher")))
    for table in tables.values():  # a table with zero-shot tasks measures quality by them alone
        table.pop("teacher", None)
        for r in table["rows"]:
            if table["tasks"] and not r["zero_shot"]:
                r["quality_retained"] = None
    return list(tables.values())


def _row(label: str, index: int | None, m: dict, teacher: dict | None) -> dict:
    keys = [k for _, k, _ in COLUMNS + SPEED_COLUMNS]
    row = {"label": label, "stage": index, **{k: m.get(k) for k in keys}, "memory_method": m.get("memory_method")}
    row["busy_cpu"] = (m.get("other_cpu_load") or 0) > CpuBusy.THRESHOLD  # others held the CPU while it was timed
    row["runtime"] = m.get("runtime")
    row["zero_shot"] = {t: {k: v.get(k) for k in ("acc", "acc_norm", "perplexity", "items")}
                        for t, v in m.get("zero_shot", {}).items()}
    teacher = teacher or {}
    row["ppl_ratio"] = _ratio(m.get("perplexity"), teacher.get("perplexity"), minus_one=True)
    row["decode_speedup"] = _ratio(m.get("decode_tokens_per_s"), teacher.get("decode_tokens_per_s"))
    row["prefill_speedup"] = _ratio(m.get("prefill_tokens_per_s"), teacher.get("prefill_tokens_per_s"))
    row["quality_retained"] = quality_retained(m, teacher)
    return row


def _ratio(a, b, minus_one: bool = False):
    if a is None or not b:
        return None
    return a / b - 1 if minus_one else a / b


def quality_retained(m: dict, teacher: dict) -> float | None:
    """Mean of model / teacher accuracy over the zero-shot tasks both have; with none, teacher
    perplexity / model perplexity."""
    ours, theirs = m.get("zero_shot", {}), teacher.get("zero_shot", {})
    shares = [ours[t]["acc"] / theirs[t]["acc"] for t in ours if t in theirs and theirs[t].get("acc")]
    if shares:
        return sum(shares) / len(shares)
    return _ratio(teacher.get("perplexity"), m.get("perplexity"))


def matrix_columns(table: dict) -> list[tuple[str, callable, str]]:
    """(header, value getter, format) of the selection matrix: size and perplexity, the zero-shot
    accuracies (acc, and acc_norm where a task has it), quality retained, speed and memory."""
    def key(k):
        return lambda r: r.get(k)

    def task(t, k):
        return lambda r: r["zero_shot"].get(t, {}).get(k)

    cols = [(h, key(k), f) for h, k, f in COLUMNS]
    for t in table.get("tasks", []):
        cols.append((f"{t} acc", task(t, "acc"), "{:.1%}"))
        if any(r["zero_shot"].get(t, {}).get("acc_norm") is not None for r in table["rows"]):
            cols.append((f"{t} acc_norm", task(t, "acc_norm"), "{:.1%}"))
    cols.append((RETAINED[0], key(RETAINED[1]), RETAINED[2]))
    return cols + [(h, key(k), f) for h, k, f in SPEED_COLUMNS]


class CpuBusy:
    THRESHOLD = 0.25  # cores other processes kept busy during a speed measurement (dsc.evaluation.CpuContention)
    MARK = " †"
    NOTE = ("† measured while other processes kept more than a quarter of a core busy: its speed is not what the "
            "model does alone (rerun on an idle machine).")


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:,.1f}" if fmt == "mb" else fmt.format(value)


def _changes_model(name: str) -> bool:
    """Whether a stage is a step of a model's history (evaluate and export leave the model as is)."""
    from dsc.registry import STAGES

    return STAGES[name].changes_model if name in STAGES else True


def protocol_line(p: dict) -> str:
    windows = f", first {p['max_windows']} windows" if p.get("max_windows") else ""
    runtime = f"; in {p['runtime']} (the teacher as an F32 GGUF)" if p.get("runtime") else ""
    return (f"perplexity on data `{p['dataset']}` (tokens {p['tokens']}), split `{p['split']}`, context "
            f"{p['context_length']}, stride {p['stride']}{windows}, {p['level']}-level{runtime}")


def _tasks_line(table: dict) -> str | None:
    items = {t: v for r in reversed(table["rows"]) for t, v in r["zero_shot"].items()}
    if not items:
        return None
    return "Zero-shot (lm-evaluation-harness conventions; acc_norm: log-likelihood per character): " + ", ".join(
        f"`{t}` ({items[t]['items']} items)" for t in table["tasks"] if t in items) + "."


def _speed_line(table: dict) -> str | None:
    methods = {r["memory_method"] for r in table["rows"] if r.get("memory_method")}
    if not methods:
        return None
    return ("Speed: prefill and greedy-decode tokens/s as measured in this run (median of repeats; see each stage's "
            f"metrics.json for the protocol); peak memory = weights + peak extra memory ({', '.join(sorted(methods))}).")


def blocks(run: Path, metrics: dict) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", file, alt)."""
    out: list[tuple] = [("h1", f"dsc report: {run.name}")]
    plots = [("img", name, name.removesuffix(".png").replace("_", " ")) for name in PLOTS if (run / name).is_file()]
    out += matrix_blocks(metrics["evaluations"], plots=plots)
    out += [("h2", "Stages"), ("table", ["#", "stage", "seconds", "checkpoint MB on disk"],
                                [[str(s["index"]), s["name"], f"{s['seconds']:.1f}",
                                  _fmt(s["metrics"].get("checkpoint_disk_bytes"), "mb")] for s in metrics["stages"]])]
    return out + training_blocks(metrics["stages"]) + export_blocks(metrics["stages"])


def export_blocks(stages: list[dict]) -> list[tuple]:
    """Files the artifact stages wrote (OUT/export/)."""
    rows = [s for s in stages if s["metrics"].get("artifacts")]
    if not rows:
        return []
    body = []
    for s in rows:
        m = s["metrics"]
        types = ", ".join(f"{k.upper()} ×{v}" for k, v in sorted(m.get("tensor_types", {}).items()))
        exact = m.get("grid_tensors_checked")
        note = [f"{exact} grid tensors bit-exact" if exact else None,
                f"{len(m['requantized'])} re-quantized" if m.get("requantized") else None,
                f"{len(m['fallback_f16'])} kept F16 (width not a multiple of 32)" if m.get("fallback_f16") else None]
        for name, size in m["artifacts"].items():
            body.append([str(s["index"]), f"export/{name}", m.get("format", "–"), _fmt(size, "mb"), types or "–",
                         "; ".join(n for n in note if n) or "–"])
    return [("h2", "Exports"), ("table", ["#", "file", "format", "MB", "tensors", "notes"], body)]


def matrix_blocks(tables: list[dict], level: str = "h2", plots: list[tuple] = ()) -> list[tuple]:
    """The selection matrices (one per perplexity protocol), each with its protocol; `plots`
    follow the first (the report, and the model card, share these blocks)."""
    out: list[tuple] = []
    for n, table in enumerate(tables):
        title = "Selection matrix" if n == 0 else f"Selection matrix {n + 1}"
        cols = matrix_columns(table)
        out += [(level, title), ("p", f"Protocol: {protocol_line(table['protocol'])}.")]
        out += [("p", line) for line in (_tasks_line(table), _speed_line(table)) if line]
        out.append(("p", RETAINED_NOTE))
        speed = {h for h, _, _ in SPEED_COLUMNS if h.endswith("tok/s")}
        out.append(("table", ["model"] + [h for h, _, _ in cols],
                    [[r["label"]] + [_fmt(get(r), f) + (CpuBusy.MARK if h in speed and r.get("busy_cpu") and get(r)
                                                        is not None else "") for h, get, f in cols]
                     for r in table["rows"]]))
        if any(r.get("busy_cpu") for r in table["rows"]):
            out.append(("p", CpuBusy.NOTE))
        if n == 0:
            out += list(plots)
    return out


def training_blocks(stages: list[dict]) -> list[tuple]:
    """Training stages: budget, speed, and the held-out loss terms before → after."""
    rows = [s for s in stages if "steps" in s["metrics"] and "tokens_per_s" in s["metrics"]]
    if not rows:
        return []
    body = []
    for s in rows:
        m = s["metrics"]
        start, end = m.get("eval_start") or {}, m.get("eval") or {}
        held = ", ".join(f"{k} {start[k]:.4g} → {end[k]:.4g}" for k in ("kl", "features", "ppl") if k in start and k in end)
        body.append([str(s["index"]), s["name"], str(m["steps"]), f"{m['tokens']:,}", f"{m['tokens_per_s']:.1f}",
                     str(m.get("processes", 1)), str(m.get("resumed_at_step") or "–"), held or "–"])
    return [("h2", "Training"),
            ("p", "Held-out terms on the stage's `eval_split` (kl: to the teacher; ppl: the student's own, on that "
                  "split), start → end."),
            ("table", ["#", "stage", "steps", "tokens", "tokens/s", "processes", "resumed at", "held-out"], body)]


def to_markdown(doc: list[tuple]) -> str:
    lines: list[str] = []
    for b in doc:
        if b[0] == "h1":
            lines += [f"# {b[1]}", ""]
        elif b[0] in ("h2", "h3"):
            lines += [f"{'#' * int(b[0][1])} {b[1]}", ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(b[1]) + " |", "|---" * len(b[1]) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(lines).rstrip() + "\n"


def to_html(doc: list[tuple]) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset=utf-8>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
             "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:48%}</style>"]
    for b in doc:
        if b[0] == "h1":
            parts += [f"<title>{e(b[1])}</title>", f"<h1>{e(b[1])}</h1>"]
        elif b[0] in ("h2", "h3", "p"):
            parts.append(f"<{b[0]}>{_code(e(b[1]))}</{b[0]}>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2]]
            parts.append("</table>")
        elif b[0] == "img":
            parts.append(f'<img src="{e(b[1])}" alt="{e(b[2])}">')
    return "\n".join(parts) + "\n"


def _code(text: str) -> str:
    """`x` → <code>x</code> (text already escaped)."""
    pieces = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def write_report(run: Path, html_too: bool = False) -> Path:
    run = Path(run)
    metrics = read_json(run / "metrics.json")
    if metrics["evaluations"]:
        plot_matrix(metrics["evaluations"][0], run)
    doc = blocks(run, metrics)
    write_text(run / "report.md", to_markdown(doc))
    if html_too:
        write_text(run / "report.html", to_html(doc))
    return run / "report.md"


def plot_matrix(table: dict, run: Path) -> list[Path]:
    """quality vs size (weight MB) and quality vs decode speed, one point per model: quality is
    perplexity (lower is better) beside the share of teacher quality retained."""
    # "(unchanged)" rows measured the teacher itself: one point for it is enough
    rows = [r for r in table["rows"] if r["weight_bytes"] and r["perplexity"] and not r["label"].endswith("(unchanged)")]
    written = []
    for name, key, xlabel in (("quality_vs_size.png", "weight_bytes", "weights (MB)"),
                              ("quality_vs_speed.png", "decode_tokens_per_s", "decode tokens/s")):
        points = [r for r in rows if r.get(key)]
        if points:
            _scatter(points, key, xlabel, table, run / name)
            written.append(run / name)
    return written


def _scatter(rows: list[dict], key: str, xlabel: str, table: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8))  # no pyplot: the caller's backend (a notebook's) stays as it was
    FigureCanvasAgg(fig)
    scale = 1e6 if key == "weight_bytes" else 1
    for i, (ykey, ylabel) in enumerate((("perplexity", "perplexity (log scale, lower is better)"),
                                        ("quality_retained", "teacher quality retained"))):
        ax = fig.add_subplot(1, 2, i + 1)
        pts = [(r[key] / scale, r[ykey], r) for r in rows if r.get(ykey) is not None]
        stages = [(x, y) for x, y, r in pts if r["label"] != "teacher"]  # in stage order: the path compression took
        if len(stages) > 1:
            ax.plot(*zip(*stages), color="C0", alpha=0.35, linewidth=1)
        for n, (x, y, r) in enumerate(pts):
            ax.scatter(x, y, color="C1" if r["label"] == "teacher" else "C0", zorder=3)
            # labels fan out (alternating above and below, further each time) so neighbours do not overlap
            dy = (8 + 5 * (n // 2)) * (1 if n % 2 == 0 else -1)
            ax.annotate(_short(r["label"]), (x, y), xytext=(4, dy), textcoords="offset points", fontsize=7,
                        arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ykey == "perplexity":
            ax.set_yscale("log")
        if ykey == "quality_retained":
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    fig.suptitle(protocol_line(table["protocol"]).replace("`", ""), fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)


def _short(label: str) -> str:
    """'stages[6] after prune → distill → lora' → 'lora (6)': the last step names the point."""
    if " after " not in label:
        return label
    head, chain = label.split(" after ", 1)
    return f"{chain.split(' → ')[-1]} ({head.removeprefix('stages[').rstrip(']')})"
