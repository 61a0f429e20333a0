"""``kvkd export``: a trained run as a normal Hugging Face model folder plus a small latent head.

The folder holds what ``transformers.AutoModelForCausalLM.from_pretrained`` loads — the student
with its LoRA adapters merged into the weights (peft ``merge_and_unload``) and the tokenizer with
``<|bot|>``/``<|eot|>`` — and two kvkd files for latent (CODI) decoding:

- ``latent.safetensors``: the CODI projection (``projection.*``) and the learned ``bot``/``eot``
  input vectors (kept here rather than written into the embedding rows, which a tied LM head
  shares: that would change the model's output distribution);
- ``kvkd_latent.json``: M (``num_latents``), the prompt template, the run and step it came from.

Aligners and router are training-only and not exported. ``kvkd eval --run FOLDER`` accepts an
exported folder as well as a run folder. The export reads the run's newest checkpoint
(``trainable.safetensors``), so runs trained with or without DeepSpeed export the same way; a
checkpoint holding NaN/inf weights is refused. A ``README.md`` model card says where the model
came from (base model, teachers and their caches, router, steps, eval results found in the run
folder) and how to decode it in latent mode. The folder is written beside its final name and
renamed into place, so a failed export leaves no folder that looks valid.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvkd.config import RuntimeArgs, opt
from kvkd.prompts import PromptTemplate
from kvkd.train.rundir import check_finite, make_readable

LATENT_CONFIG = "kvkd_latent.json"
LATENT_WEIGHTS = "latent.safetensors"


def is_export(folder: str | Path) -> bool:
    """True if ``folder`` is a ``kvkd export`` folder."""
    return (Path(folder) / LATENT_CONFIG).is_file()


@dataclass
class ExportConfig(RuntimeArgs):
    """Options of ``kvkd export`` (besides runtime: ``--trust-remote-code`` is needed to export a
    student whose checkpoint ships its own code; the run folder's record never grants it).

    Attributes:
        run: a ``kvkd train`` run folder; its newest checkpoint is exported.
        out: the folder to write.
        overwrite: replace an existing non-empty folder.
    """

    run: str = opt("", help="A `kvkd train` run folder (plain or DeepSpeed); its newest checkpoint is exported")
    out: str = opt("", help="Folder to write: a Hugging Face model (LoRA merged) + tokenizer + latent head + README.md model card")
    overwrite: bool = opt(False, cli="overwrite/no-overwrite", help="Replace an existing non-empty --out folder")


def _drop_null_keys(config_path: Path) -> None:
    """Remove leftovers such as ``"quantization_config": null`` (a de-quantised GGUF) from a saved config."""
    cfg = json.loads(config_path.read_text())
    cleaned = {k: v for k, v in cfg.items() if not (v is None and k in ("quantization_config",))}
    if cleaned != cfg:
        config_path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def _eval_results(run: Path) -> list[dict]:
    """Eval results the run folder knows of (a sweep cell's ``cell.json``)."""
    cell = run / "cell.json"
    if cell.is_file():
        return [dict(name=n, **{k: r.get(k) for k in ("n", "accuracy", "ci_low", "ci_high", "mean_answer_nll")}) for n, r in json.loads(cell.read_text()).get("evals", {}).items()]
    return []


def model_card(resolved: dict, step: int, run: Path, evals: list[dict]) -> str:
    """The export's ``README.md``: base model, teachers and caches, router, steps, evals, usage."""
    teachers = resolved.get("teachers") or [{"cache": c} for c in resolved.get("caches", [])]
    lines = [
        "---", "library_name: transformers", "tags: [kvkd, knowledge-distillation, latent-reasoning, codi]", "---", "",
        f"# Latent (CODI) student distilled with kvkd from {len(teachers)} teacher KV cache(s)", "",
        f"- **Base model (student):** `{resolved.get('student')}`",
        f"- **Router:** `{resolved.get('router')}` {json.dumps(resolved.get('router_options') or {})}; fusion `{resolved.get('fusion')}`",
        f"- **Losses:** CE + {resolved.get('a1')} x CODI ({resolved.get('hidden_loss')}) + {resolved.get('a2')} x KV ({resolved.get('kv_loss')})"
        f" + {resolved.get('a3')} x CKA; KV weighting `{resolved.get('kv_weighting')}`",
        f"- **Training:** step {step} of {resolved.get('steps')}, batch {resolved.get('batch_size')}, lr {resolved.get('lr')}, seed {resolved.get('seed')}"
        f", LoRA {'r=' + str(resolved.get('lora_r')) + ' (merged)' if resolved.get('use_lora') else 'off (full fine-tune)'}",
        f"- **Latent thoughts:** M = {resolved.get('latents')}", f"- **Run folder:** `{run}`", "", "## Teachers", "",
        "| cache | teacher | trace | layers/KV heads/head dim/hidden | tokenizer shared with the student |", "|---|---|---|---|---|",
    ]
    for t in teachers:
        sh = t.get("shape", {})
        lines.append(f"| `{t.get('cache')}` | {t.get('model', t.get('teacher', '?'))} | {t.get('trace', '?')} | "
                     f"{sh.get('num_layers')}/{sh.get('num_kv_heads')}/{sh.get('head_dim')}/{sh.get('hidden_size')} | {t.get('tokenizer_shared_with_student')} |")
    lines += ["", "## Evaluation", ""]
    if evals:
        lines += ["| set | n | accuracy | 95% CI | gold-answer NLL (nats/token) |", "|---|---|---|---|---|"]
        lines += [f"| {e['name']} | {e['n']} | {100 * e['accuracy']:.1f}% | {100 * e['ci_low']:.1f}-{100 * e['ci_high']:.1f}% | {e['mean_answer_nll']:.3f} |" for e in evals]
    else:
        lines.append("No evaluation was recorded in the run folder; run `kvkd eval --run THIS_FOLDER --data DATA`.")
    lines += [
        "", "## Use", "",
        "The folder loads as a plain causal LM (`AutoModelForCausalLM.from_pretrained(folder)`), but it was trained to",
        "answer after M continuous thoughts, which only kvkd decodes:", "",
        "    kvkd eval --run THIS_FOLDER --data questions.jsonl      # latent mode: Q <bot> z_1..z_M <eot> The answer is:", "",
        "or in Python: `from kvkd.train.export import load_export; student, meta = load_export(folder)`, then",
        "`student.generate(q_ids, q_mask, prompt_ids)` with the prompt template recorded in `kvkd_latent.json`.",
        f"`{LATENT_WEIGHTS}` holds the CODI projection and the <bot>/<eot> input vectors; provenance (library versions, device)",
        "is in `kvkd_latent.json`.", "",
    ]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write a run's newest checkpoint as a Hugging Face folder + latent head + model card (see
    module doc).

    Args:
        run_dir: a ``kvkd train`` run folder with at least one complete checkpoint.
        out_dir: the folder to create.
        overwrite: replace an existing non-empty folder.
        trust_remote_code: let the student's checkpoint run its own code (only from the caller).
    Returns:
        ``out_dir`` as a Path.
    Raises:
        FileNotFoundError: the run has no config or checkpoint.
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
        kvkd.train.rundir.NonFiniteError: the checkpoint holds NaN/inf weights.
    """
    from kvkd.train.trainer import load_run

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    student, resolved = load_run(run_dir, trust_remote_code=trust_remote_code)
    lm = student.lm
    if hasattr(lm, "merge_and_unload"):  # peft: fold the LoRA deltas into the base weights
        lm = lm.merge_and_unload()
    check_finite(dict(lm.state_dict()), f"the merged student of {run_dir}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm.save_pretrained(tmp)
    _drop_null_keys(tmp / "config.json")
    student.tokenizer.save_pretrained(tmp)
    head = {f"projection.{k}": v.detach().contiguous() for k, v in student.projection.state_dict().items()}
    head["bot"] = student.bot.detach().contiguous()
    head["eot"] = student.eot.detach().contiguous()
    save_file(head, str(tmp / LATENT_WEIGHTS))
    meta = {
        "num_latents": student.num_latents,
        "template": student.template.to_json(),
        "run": str(Path(run_dir).resolve()),
        "step": resolved["checkpoint_step"],
        "student": resolved.get("student"),
        "dtype": resolved.get("dtype", "float32"),
        "provenance": resolved.get("provenance"),
    }
    (tmp / LATENT_CONFIG).write_text(json.dumps(meta, indent=2))
    (tmp / "README.md").write_text(model_card(resolved, resolved["checkpoint_step"], Path(run_dir).resolve(), _eval_results(Path(run_dir))))
    make_readable(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_export(folder: str | Path, dtype: str | None = None, trust_remote_code: bool = False):
    """Rebuild the latent student from an exported folder (for ``kvkd eval``).

    Args:
        folder: a folder written by :func:`export_run`.
        dtype: load dtype (default: the one recorded at export).
        trust_remote_code: let the folder's model run its own code (only from the caller).
    Returns:
        (LatentStudent in eval mode, the ``kvkd_latent.json`` dict).
    Raises:
        FileNotFoundError: the folder is not a kvkd export.
        kvkd.train.rundir.NonFiniteError: its weights hold NaN/inf.
    """
    from kvkd.models import load_model
    from kvkd.train.student import LatentStudent

    folder = Path(folder)
    if not is_export(folder):
        raise FileNotFoundError(f"{folder} has no {LATENT_CONFIG}: not a `kvkd export` folder")
    meta = json.loads((folder / LATENT_CONFIG).read_text())
    loaded = load_model(str(folder), dtype=dtype or meta.get("dtype", "float32"), trust_remote_code=trust_remote_code)
    student = LatentStudent(loaded.model, loaded.tokenizer, meta["num_latents"], PromptTemplate.from_json(meta["template"]))
    head = load_file(str(folder / LATENT_WEIGHTS))
    check_finite({**head, **dict(loaded.model.state_dict())}, f"export {folder}")
    student.projection.load_state_dict({k[len("projection."):]: v for k, v in head.items() if k.startswith("projection.")})
    with torch.no_grad():
        student.bot.copy_(head["bot"])
        student.eot.copy_(head["eot"])
    student.model_info = loaded.info
    student.eval()
    return student, meta
