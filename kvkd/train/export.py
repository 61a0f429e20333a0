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
(``trainable.safetensors``), so runs trained with or without DeepSpeed export the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvkd.prompts import PromptTemplate

LATENT_CONFIG = "kvkd_latent.json"
LATENT_WEIGHTS = "latent.safetensors"


def is_export(folder: str | Path) -> bool:
    """True if ``folder`` is a ``kvkd export`` folder."""
    return (Path(folder) / LATENT_CONFIG).is_file()


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a run's newest checkpoint as a Hugging Face folder + latent head (see module doc).

    Args:
        run_dir: a ``kvkd train`` run folder with at least one complete checkpoint.
        out_dir: the folder to create.
        overwrite: allow writing into an existing non-empty folder.
    Returns:
        ``out_dir`` as a Path.
    Raises:
        FileNotFoundError: the run has no config or checkpoint.
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    from kvkd.train.trainer import latest_checkpoint, load_run

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    student, resolved = load_run(run_dir)
    ckpt = latest_checkpoint(Path(run_dir))
    lm = student.lm
    if hasattr(lm, "merge_and_unload"):  # peft: fold the LoRA deltas into the base weights
        lm = lm.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
    student.tokenizer.save_pretrained(out)
    head = {f"projection.{k}": v.detach().contiguous() for k, v in student.projection.state_dict().items()}
    head["bot"] = student.bot.detach().contiguous()
    head["eot"] = student.eot.detach().contiguous()
    save_file(head, str(out / LATENT_WEIGHTS))
    meta = {
        "num_latents": student.num_latents,
        "template": student.template.to_json(),
        "run": str(Path(run_dir).resolve()),
        "step": json.loads((ckpt / "state.json").read_text())["step"],
        "student": resolved.get("student"),
        "dtype": resolved.get("dtype", "float32"),
    }
    (out / LATENT_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def load_export(folder: str | Path, dtype: str | None = None):
    """Rebuild the latent student from an exported folder (for ``kvkd eval``).

    Args:
        folder: a folder written by :func:`export_run`.
        dtype: load dtype (default: the one recorded at export).
    Returns:
        (LatentStudent in eval mode, the ``kvkd_latent.json`` dict).
    Raises:
        FileNotFoundError: the folder is not a kvkd export.
    """
    from kvkd.models import load_model
    from kvkd.train.student import LatentStudent

    folder = Path(folder)
    if not is_export(folder):
        raise FileNotFoundError(f"{folder} has no {LATENT_CONFIG}: not a `kvkd export` folder")
    meta = json.loads((folder / LATENT_CONFIG).read_text())
    loaded = load_model(str(folder), dtype=dtype or meta.get("dtype", "float32"))
    student = LatentStudent(loaded.model, loaded.tokenizer, meta["num_latents"], PromptTemplate.from_json(meta["template"]))
    head = load_file(str(folder / LATENT_WEIGHTS))
    student.projection.load_state_dict({k[len("projection."):]: v for k, v in head.items() if k.startswith("projection.")})
    with torch.no_grad():
        student.bot.copy_(head["bot"])
        student.eot.copy_(head["eot"])
    student.model_info = loaded.info
    student.eval()
    return student, meta
