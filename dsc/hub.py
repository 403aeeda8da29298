"""huggingface_hub behind one adapter: the model card every published model folder carries
(`README.md` with the Hub's YAML metadata), and `dsc push`.

The card says what a user reads on the Hub and what `huggingface_hub.ModelCard.load` parses:
`base_model` (the teacher, where it has a Hub id), `library_name`, `pipeline_tag`, `tags`, the
license inherited from the teacher where it is known, the quantization, the stages applied with
their settings, the evaluation table with its protocol (as `model-index` too, for the Hub's
evaluation widget), the recipe and the dsc version.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from dsc.errors import DscInputError, RemoteError

CARD = "README.md"
QUANT_STAGES = ("rtn", "awq", "int8", "qat")
STAGE_TAGS = {"prune": "pruned", "distill": "distilled", "lora": "lora", "cast": "cast"}


def teacher_license(folder: Path) -> str | None:
    """The license a local teacher's own card declares, if it has one."""
    from huggingface_hub import ModelCard

    card = Path(folder) / CARD
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 - someone else's card: bad YAML, odd keys; the license is then unknown
        return None


def quantization(folder: Path) -> dict | None:
    """What config.json says of the weights' quantization: method, format, bits."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not cfg:
        return None
    groups = cfg.get("config_groups") or {}
    bits = sorted({g["weights"]["num_bits"] for g in groups.values() if (g.get("weights") or {}).get("num_bits")})
    acts = sorted({g["input_activations"]["num_bits"] for g in groups.values() if g.get("input_activations")})
    return {"quant_method": cfg.get("quant_method"), "format": cfg.get("format"), "weight_bits": bits,
            "activation_bits": acts}


def card_text(*, title: str, teacher: dict, stages: list[dict], tables: list[dict], own_rows: list[tuple[dict, dict]],
              quant: dict | None, recipe_yaml: str, version: str) -> str:
    """The card as text. `stages`: {index, name, config} applied to make this model; `tables`: the
    run's evaluation tables (dsc.report); `own_rows`: (row, its table) for the rows that measured this very model."""
    from huggingface_hub import EvalResult, ModelCardData

    from dsc import report

    tags = ["dsc", "compressed"] + sorted({STAGE_TAGS[s["name"]] for s in stages if s["name"] in STAGE_TAGS})
    tags += sorted({s["name"] for s in stages if s["name"] in QUANT_STAGES})
    if quant:
        tags += [f"{b}-bit" for b in quant["weight_bits"]] + [quant["quant_method"] or "quantized"]
    results = []
    for row, table in own_rows:
        proto = table["protocol"]
        if row.get("perplexity") is not None:
            results.append(EvalResult(task_type="text-generation", dataset_type=proto["dataset"],
                                      dataset_name=proto["dataset"], dataset_split=proto["split"],
                                      metric_type="perplexity", metric_value=round(row["perplexity"], 4),
                                      metric_config=report.protocol_line(proto).replace("`", "")))
        for task, v in row["zero_shot"].items():
            if v.get("acc") is not None:
                results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                          metric_type="accuracy", metric_value=round(v["acc"], 4)))
    data = ModelCardData(base_model=teacher.get("hub_id"), library_name="transformers", pipeline_tag="text-generation",
                         license=teacher.get("license"), tags=list(dict.fromkeys(tags)), model_name=title,
                         eval_results=results or None, **({"quantization": quant} if quant else {}))
    body = [f"# {title}", "",
            f"A Lite model made by [dsc](https://pypi.org/project/dsc/) {version} from the teacher "
            f"`{teacher.get('hub_id') or teacher['path']}`"
            + (f" (license {teacher['license']}, inherited)." if teacher.get("license") else "."), ""]
    body += ["## Stages applied", ""]
    if stages:
        body += ["| # | stage | settings (non-default) |", "|---|---|---|"]
        body += [f"| {s['index']} | {s['name']} | `{json.dumps(s['config'], separators=(',', ':'))}` |" for s in stages]
    else:
        body.append("None: this is the teacher, as loaded.")
    body += ["", "## Evaluation", ""]
    if tables:
        body.append(report.to_markdown(report.matrix_blocks(tables, level="h3")).rstrip())
    else:
        body.append("No evaluate stage had run when this model was written: see the run's `report.md`.")
    if quant:
        body += ["", "## Quantization", "",
                 f"{quant['quant_method']} ({quant['format']}), weights {', '.join(map(str, quant['weight_bits']))}-bit"
                 + (f", activations {', '.join(map(str, quant['activation_bits']))}-bit" if quant["activation_bits"]
                    else "") + ": transformers loads it with `compressed-tensors` installed; vLLM serves it."]
    body += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")',
             'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")', "```",
             "", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_card(folder: Path, text: str) -> Path:
    path = Path(folder) / CARD
    path.write_text(text, encoding="utf-8")
    return path


# -- dsc push -------------------------------------------------------------------------------------
def _network_errors() -> tuple[type, ...]:
    """What the Hub client raises when the Hub cannot be reached or refuses: its own HTTP and
    offline errors, and the HTTP client's transport errors (its own classes)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type] = [HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            cls = getattr(importlib.import_module(module), "HTTPError", None)
        except ImportError:
            continue
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def push(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None,
         message: str = "Upload Lite model made by dsc") -> str:
    """Upload `folder` (a model folder with its card) to the Hub model repo `repo_id`; returns its URL."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DscInputError("output", f"{folder} holds no model (no config.json): run the recipe first, "
                            "with output.save_model: true")
    if not (folder / CARD).is_file():
        raise DscInputError("output", f"{folder} has no model card ({CARD}): rerun the recipe with this dsc version")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import validate_repo_id
    except ImportError as exc:
        raise DscInputError("push", f"needs huggingface_hub: pip install huggingface_hub ({exc})") from None
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:  # HFValidationError: bad input, not worth a retry
        raise DscInputError("repo_id", f"{repo_id!r} is not a Hub repo id like 'me/smollm2-lite': "
                            f"{' '.join(str(exc).split())}") from None
    if "/" not in repo_id:
        raise DscInputError("repo_id", f"{repo_id!r}: give the namespace too, like 'me/{repo_id}'")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except _network_errors() as exc:
        raise RemoteError(f"could not push {folder} to the Hub repo {repo_id!r}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:400]}. Check the network, HF_TOKEN (`hf auth login`) and "
                          "that the repo id is yours; nothing was changed locally") from None
    return str(url)
