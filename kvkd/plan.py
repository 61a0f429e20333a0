"""``kvkd extract --dry-run``: what an extraction would produce, before anything heavy runs.

Reads the teacher's config and tokenizer only (no weights; a GGUF through its metadata),
the data set and its traces, and returns an :class:`ExtractionPlan`: the teacher's shapes,
its tokenizer identity, the tokens the teacher would read, the cache's arrays and their
size for the chosen codec, and -- given a student -- the layer map and projections a
training run would use. Nothing is written. It sits at the package top level because it
joins extraction options (``kvkd.pipeline``) with training's alignment (``kvkd.train``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvkd.cache.codecs import get_codecs
from kvkd.cache.compat import tokenizer_differences
from kvkd.cache.schema import CacheLayout
from kvkd.data import load_examples
from kvkd.models import load_config, tokenizer_identity
from kvkd.pipeline.extract import ExtractConfig, resolve_traces
from kvkd.prompts import PromptTemplate
from kvkd.train.align import LayerMapSpec, Shape, layer_map


@dataclass
class ExtractionPlan:
    """What ``kvkd extract`` would do with a config (sizes in bytes, counts in tokens/rows).

    Attributes:
        teacher: spec; teacher_info: architecture and sizes (num_layers, num_heads,
            num_kv_heads, head_dim, hidden_size ...); tokenizer: its identity.
        rows: examples selected; teacher_tokens: tokens the teacher reads over all rows
            (question + CoT + answer); max_tokens: longest row.
        slots: M; codec: storage codec name.
        arrays: name -> [per-example shape, stored dtype].
        bytes_per_example: stored bytes of one example, uncompressed (an upper bound: the
            byte compressor usually saves a little on float data).
        total_bytes: bytes_per_example * rows; examples_per_shard, num_shards: the shard cut.
        student: None, or the student's spec, shape, layer map, projections and whether it
            shares the teacher's tokenizer.
    """

    teacher: str
    teacher_info: dict
    tokenizer: dict
    rows: int
    teacher_tokens: int
    max_tokens: int
    slots: int
    codec: str
    arrays: dict
    bytes_per_example: int
    total_bytes: int
    examples_per_shard: int
    num_shards: int
    student: dict | None = None
    trace_fallback_rows: list = field(default_factory=list)


def plan_extraction(cfg: ExtractConfig, student: str | None = None, layer_map_spec: LayerMapSpec = "proportional", template: PromptTemplate = PromptTemplate()) -> ExtractionPlan:
    """Plan an extraction without running the teacher.

    Args:
        cfg: extraction options (``out`` is not needed).
        student: optional student spec; its config and tokenizer are read the same way.
        layer_map_spec: layer map to show against the student (see ``kvkd.train.align.layer_map``).
        template: prompt layout.
    Returns:
        ExtractionPlan.
    Raises:
        kvkd.models.ModelLoadError: a model's config cannot be read.
        kvkd.data.DataError: unreadable rows or empty traces (as ``kvkd extract`` would).
        ValueError: no rows selected, an unknown codec, or a layer map that does not fit.
    """
    data = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, limit=cfg.limit, offset=cfg.offset)
    if not data.examples:
        raise ValueError(f"{cfg.data}: no examples selected (offset={cfg.offset}, limit={cfg.limit})")
    traces, fallback_ids = resolve_traces(data.examples, cfg)
    teacher = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    texts = [template.teacher_text(ex.question, tr, ex.answer)[0] for ex, tr in zip(data.examples, traces)]
    lengths = [len(ids) for ids in teacher.tokenizer(texts)["input_ids"]]
    info = teacher.info
    codec = get_codecs(cfg.codec)
    layout = CacheLayout(len(data.examples), info["num_layers"], info["num_kv_heads"], info["head_dim"], info["hidden_size"], cfg.slots, cfg.examples_per_shard).resolved(codec)
    per_example = layout.bytes_per_example(codec)
    t_identity = tokenizer_identity(teacher.tokenizer)
    plan = ExtractionPlan(
        teacher=cfg.model,
        teacher_info=info,
        tokenizer=t_identity,
        rows=len(data.examples),
        teacher_tokens=sum(lengths),
        max_tokens=max(lengths),
        slots=cfg.slots,
        codec=codec.name,
        arrays={name: [list(spec.shape), str(spec.dtype)] for name, spec in layout.arrays(codec).items()},
        bytes_per_example=per_example,
        total_bytes=per_example * layout.num_examples,
        examples_per_shard=layout.examples_per_shard,
        num_shards=layout.num_shards,
        trace_fallback_rows=list(fallback_ids),
    )
    if student:
        s = load_config(student, trust_remote_code=cfg.trust_remote_code)
        t_shape, s_shape = Shape.from_layout(info), Shape.from_layout(s.info)
        n_t, n_s = t_shape.num_kv_heads * t_shape.head_dim, s_shape.num_kv_heads * s_shape.head_dim
        plan.student = {
            "spec": student,
            "shape": {k: s.info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size")},
            "layer_map": layer_map(t_shape.num_layers, s_shape.num_layers, layer_map_spec),
            "kv_projection": "identity" if (t_shape.num_kv_heads, t_shape.head_dim) == (s_shape.num_kv_heads, s_shape.head_dim) else f"learned {n_t} -> {n_s} per student layer (keys and values)",
            "hidden_projection": "identity" if t_shape.hidden_size == s_shape.hidden_size else f"learned {t_shape.hidden_size} -> {s_shape.hidden_size} per student layer + embeddings",
            "tokenizer_shared": not tokenizer_differences(t_identity, tokenizer_identity(s.tokenizer)),
        }
    return plan
