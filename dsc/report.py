"""metrics.json, report.md (+ HTML) and the quality-vs-size plot, rebuilt from a run directory."""
from __future__ import annotations

import html
from pathlib import Path

from dsc.fingerprint import hash_json, read_json, write_text

COLUMNS = [  # (header, key in a metrics row, format)
    ("params", "params", "{:,}"),
    ("non-emb params", "params_non_embedding", "{:,}"),
    ("weights MB", "weight_bytes", "mb"),
    ("perplexity", "perplexity", "{:.4f}"),
    ("ppl vs teacher", "ppl_ratio", "{:+.2%}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("peak mem MB", "peak_memory_bytes", "mb"),
]


def collect_metrics(run: Path) -> dict:
    """Every finished stage's metrics, in order, plus the evaluation tables."""
    stages = []
    for d in sorted((Path(run) / "stages").glob("[0-9]*")):
        if (d / "stage.json").is_file():
            info = read_json(d / "stage.json")
            stages.append({"index": info["index"], "name": info["name"], "folder": d.name,
                           "seconds": info["seconds"], "metrics": read_json(d / "metrics.json")})
    return {"stages": stages, "evaluations": evaluation_tables(stages)}


def evaluation_tables(stages: list[dict]) -> list[dict]:
    """One table per evaluation protocol: the teacher, then each evaluate stage under it."""
    tables: dict[str, dict] = {}
    for s in stages:
        m = s["metrics"]
        if s["name"] != "evaluate":
            continue
        proto = m["model"]["protocol"]
        table = tables.setdefault(hash_json(proto), {"protocol": proto, "rows": []})
        after = [p["name"] for p in stages if p["index"] < s["index"] and p["name"] != "evaluate"]
        if "teacher" in m and not any(r["label"] == "teacher" for r in table["rows"]):
            table["rows"].insert(0, _row("teacher", m["teacher"], None))
        teacher_ppl = m.get("teacher", {}).get("perplexity")
        label = f"stages[{s['index']}] after {' → '.join(after)}" if after else f"stages[{s['index']}] (unchanged)"
        table["rows"].append(_row(label, m["model"], teacher_ppl))
    return list(tables.values())


def _row(label: str, m: dict, teacher_ppl: float | None) -> dict:
    row = {"label": label, **{k: m.get(k) for _, k, _ in COLUMNS}}
    row["ppl_ratio"] = m["perplexity"] / teacher_ppl - 1 if teacher_ppl else None
    return row


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:,.1f}" if fmt == "mb" else fmt.format(value)


def protocol_line(p: dict) -> str:
    windows = f", first {p['max_windows']} windows" if p.get("max_windows") else ""
    return (f"data `{p['dataset']}` (tokens {p['tokens']}), split `{p['split']}`, context {p['context_length']}, "
            f"stride {p['stride']}{windows}, {p['level']}-level")


def write_report(run: Path, html_too: bool = False) -> Path:
    run = Path(run)
    metrics = read_json(run / "metrics.json")
    lines = [f"# dsc report: {run.name}", ""]
    lines += ["## Stages", "", "| # | stage | seconds | checkpoint MB on disk |", "|---|---|---|---|"]
    lines += [f"| {s['index']} | {s['name']} | {s['seconds']:.1f} | "
              f"{_fmt(s['metrics'].get('checkpoint_disk_bytes'), 'mb')} |" for s in metrics["stages"]]
    lines += training_lines(metrics["stages"])
    for n, table in enumerate(metrics["evaluations"]):
        lines += ["", f"## Evaluation {n + 1}", "", f"Protocol: {protocol_line(table['protocol'])}.", ""]
        lines += ["| model | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for r in table["rows"]:
            lines.append(f"| {r['label']} | " + " | ".join(_fmt(r[k], f) for _, k, f in COLUMNS) + " |")
    if metrics["evaluations"] and _plot(metrics["evaluations"][0], run / "quality_vs_size.png"):
        lines += ["", "![quality vs size](quality_vs_size.png)"]
    write_text(run / "report.md", "\n".join(lines) + "\n")
    if html_too:
        write_text(run / "report.html", _html(run.name, metrics))
    return run / "report.md"


def training_lines(stages: list[dict]) -> list[str]:
    """Training stages: budget, speed, and the held-out loss terms before → after."""
    rows = [s for s in stages if "steps" in s["metrics"] and "tokens_per_s" in s["metrics"]]
    if not rows:
        return []
    out = ["", "## Training", "", "Held-out terms on the stage's `eval_split` (kl: to the teacher; ppl: the "
           "student's own, on that split), start → end.", "",
           "| # | stage | steps | tokens | tokens/s | processes | resumed at | held-out |", "|---" * 8 + "|"]
    for s in rows:
        m = s["metrics"]
        start, end = m.get("eval_start") or {}, m.get("eval") or {}
        held = ", ".join(f"{k} {start[k]:.4g} → {end[k]:.4g}" for k in ("kl", "features", "ppl") if k in start and k in end)
        out.append(f"| {s['index']} | {s['name']} | {m['steps']} | {m['tokens']:,} | {m['tokens_per_s']:.1f} | "
                   f"{m.get('processes', 1)} | {m.get('resumed_at_step') or '–'} | {held or '–'} |")
    return out


def _plot(table: dict, path: Path) -> bool:
    # "(unchanged)" rows measured the teacher itself: one point for it is enough
    rows = [r for r in table["rows"] if r["weight_bytes"] and r["perplexity"] and not r["label"].endswith("(unchanged)")]
    if not rows:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))  # no pyplot: the caller's backend (a notebook's) stays as it was
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(r["weight_bytes"] / 1e6, r["perplexity"], color="C1" if r["label"] == "teacher" else "C0")
        ax.annotate(r["label"], (r["weight_bytes"] / 1e6, r["perplexity"]), fontsize=7)
    ax.set_xlabel("weights (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(protocol_line(table["protocol"]).replace("`", ""), fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return True


def _html(name: str, metrics: dict) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>dsc report: {html.escape(name)}</title>",
             f"<h1>dsc report: {html.escape(name)}</h1>"]
    for table in metrics["evaluations"]:
        parts.append(f"<p>Protocol: {html.escape(protocol_line(table['protocol']))}</p><table border=1>")
        parts.append("<tr><th>model</th>" + "".join(f"<th>{h}</th>" for h, _, _ in COLUMNS) + "</tr>")
        for r in table["rows"]:
            cells = "".join(f"<td>{_fmt(r[k], f)}</td>" for _, k, f in COLUMNS)
            parts.append(f"<tr><td>{html.escape(r['label'])}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append('<img src="quality_vs_size.png" alt="quality vs size">')
    return "\n".join(parts) + "\n"
