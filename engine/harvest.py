"""Harvesting: documents in, one Arrow record batch of activations per document out.

A harvest runs a prefill-only forward over each document's tokens (no generation, no sampled
token) with the same `Capture` the server captures with, so a harvested value is exactly what
`Model.generate(prompt=..., hooks=..., max_tokens=1)` returns for the prompt's positions. One
row per token: `doc_id`, `position`, `token_id`, and one fixed-size-list column per hook,
named by the hook as the user wrote it, holding that token's tensor flattened in token-major
order (the per-token shape is in the field's metadata; attention scores and patterns have
their key axis padded to the context length with -inf and 0).

Reading the input files and writing Parquet shards is the `harvest` package's (MLX-free);
this module only needs a loaded model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

import engine  # noqa: F401  (loads OpenBLAS before mlx.core)
from engine.capture import Capture
from engine.errors import ContextLengthExceeded, InvalidArgument
from engine.generate import Forward
from engine.hooks import HookTarget, per_token_shape, resolve_hooks
from engine.model import LoadedModel
from engine.params import CaptureOptions, HookSpec, SamplingParams, parse
from engine.plan import prompt_ids
from shm.format import column_names, stack_token_major
from vocabulary import COMPONENTS

DOC_ID, POSITION, TOKEN_ID = "doc_id", "position", "token_id"
HARVEST_DTYPES = ("float32", "float16")
_NP = {"float32": np.float32, "float16": np.float16}
_PA = {"float32": pa.float32(), "float16": pa.float16()}


def hook_specs_from_names(names: Iterable[str]) -> list[HookSpec]:
    """`blocks.3.hook_resid_post` (a TransformerLens name) or `layer_name:component`
    (`model.layers.3:residual`, `transformer.h.3:attention_pattern`); each hook's id, and so its
    column name, is the name as written."""
    specs = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument(f"hook {i} is empty", f"hooks[{i}]")
        layer, sep, component = name.strip().partition(":")
        spec = parse(HookSpec, f"hooks[{i}]", layer_name=layer, component=component if sep else None,
                     hook_id=name.strip())
        specs.append(spec)
    if not specs:
        raise InvalidArgument("give at least one hook", "hooks")
    return specs


@dataclass(frozen=True)
class Column:
    name: str
    target: HookTarget
    shape: tuple[int, ...]  # per token, the key axis padded to the context

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def capture_prompt(lm: LoadedModel, token_ids: list[int], targets: list[HookTarget], dtype: str = "float32",
                   key_pad_to: int | None = None) -> dict[str, np.ndarray]:
    """One prefill-only forward over `token_ids` with a Capture installed (the server's capture
    code; no logits, no sampled token). Returns column name (as `CaptureResult.arrays` names
    them) -> [T, *per_token] token-major numpy arrays; key-padded components padded to
    `key_pad_to` (default T)."""
    capture = Capture(lm, list(targets), CaptureOptions(dtype=dtype))
    with capture.installed(lm):
        Forward(lm, SamplingParams(max_tokens=1, temperature=0), capture)(list(token_ids), sample=False)
    names = column_names([(r.hook_id, r.is_input) for r in capture.records])
    out = {}
    for name, rec in zip(names, capture.records):
        pad = key_pad_to if COMPONENTS[rec.component].key_pad is not None else None
        out[name] = stack_token_major(rec.component, [s.array for s in rec.steps], key_pad_to=pad)
    return out


class Harvester:
    """Tokenizes documents and turns each into one record batch (rows = its tokens)."""

    def __init__(self, lm: LoadedModel, hooks: list[str], *, context: int, truncate: bool = False,
                 dtype: str = "float32"):
        if dtype not in HARVEST_DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(HARVEST_DTYPES)} (got {dtype!r})", "dtype")
        limit = lm.info.context_length
        if not isinstance(context, int) or context < 1 or context > limit:
            raise InvalidArgument(f"context must be between 1 and the model's context length {limit} "
                                  f"(got {context})", "context")
        self.lm, self.context, self.truncate, self.dtype = lm, context, truncate, dtype
        self.hook_names = [h.strip() for h in hooks]
        self.targets = resolve_hooks(lm, hook_specs_from_names(hooks), "hooks")
        names = column_names([(t.hook_id, t.is_input) for t in self.targets])
        self.columns = [Column(n, t, tuple(context if d == -1 else d for d in per_token_shape(lm, t.component)))
                        for n, t in zip(names, self.targets)]
        self.schema = pa.schema(
            [pa.field(DOC_ID, pa.int64(), nullable=False), pa.field(POSITION, pa.int32(), nullable=False),
             pa.field(TOKEN_ID, pa.int32(), nullable=False)]
            + [pa.field(c.name, pa.list_(pa.field("item", _PA[dtype], nullable=False), c.size), nullable=False,
                        metadata={"nsbridge.shape": json.dumps(list(c.shape)),
                                  "nsbridge.component": c.target.component,
                                  "nsbridge.layer": json.dumps(c.target.layer),
                                  "nsbridge.is_input": json.dumps(c.target.is_input)})
               for c in self.columns])

    def hooks_description(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "component": c.target.component, "layer": c.target.layer,
                 "is_input": c.target.is_input, "shape": list(c.shape),
                 **({"key_pad": COMPONENTS[c.target.component].key_pad}
                    if COMPONENTS[c.target.component].key_pad is not None else {})}
                for c in self.columns]

    def tokenize(self, doc: dict, where: str) -> tuple[list[int], bool]:
        """A document's token ids: `{"text": ...}` as raw text (BOS as mlx-lm adds it), `{"messages":
        [...]}` with the chat template (as the server renders a chat, ending with the assistant's
        turn). Longer than the context: an error naming `where`, or cut with `truncate` (then the
        flag is True). Empty text gives no tokens (the caller skips it)."""
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{where}: a document must be an object with 'text' or 'messages' "
                                  f"(got {type(doc).__name__})", where)
        text, messages = doc.get("text"), doc.get("messages")
        if (text is None) == (messages is None):
            raise InvalidArgument(f"{where}: a document needs exactly one of 'text' (a string) or 'messages' "
                                  f"(a chat); it has {', '.join(sorted(map(str, doc))) or 'no fields'}", where)
        if text is not None:
            if not isinstance(text, str):
                raise InvalidArgument(f"{where}: 'text' must be a string (got {type(text).__name__})", where)
            if not text:
                return [], False
        try:
            ids, _ = prompt_ids(self.lm, messages=messages) if messages is not None else \
                prompt_ids(self.lm, prompt=text)
        except InvalidArgument as exc:
            if text is not None and "no tokens" in exc.message:
                return [], False
            raise InvalidArgument(f"{where}: {exc.message}", where) from None
        if len(ids) > self.context:
            if not self.truncate:
                raise ContextLengthExceeded(f"{where} has {len(ids)} tokens, more than the context of "
                                            f"{self.context}; raise --context (at most the model's "
                                            f"{self.lm.info.context_length}) or pass --truncate", where)
            return ids[: self.context], True
        return ids, False

    def batch(self, doc_id: int, token_ids: list[int]) -> pa.RecordBatch:
        """The document's rows: one forward over its tokens, every hook captured."""
        arrays = capture_prompt(self.lm, token_ids, self.targets, self.dtype, key_pad_to=self.context)
        n = len(token_ids)
        cols: list[pa.Array] = [pa.array(np.full(n, doc_id, np.int64)), pa.array(np.arange(n, dtype=np.int32)),
                                pa.array(np.asarray(token_ids, np.int32))]
        for c in self.columns:
            a = np.ascontiguousarray(arrays[c.name], dtype=_NP[self.dtype]).reshape(n, c.size)
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), c.size))
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)


def weights_hash(lm: LoadedModel) -> str:
    """sha256 over every parameter (name, dtype, shape, bytes), in name order: the same numbers
    give the same hash, whichever file they were loaded from."""
    from mlx.utils import tree_flatten

    from shm.format import to_numpy

    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(lm.model.parameters()), key=lambda kv: kv[0]):
        a = np.ascontiguousarray(to_numpy(value))
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        h.update(memoryview(a).cast("B"))
    return "sha256:" + h.hexdigest()


def tokenizer_description(lm: LoadedModel) -> dict[str, Any]:
    """What decides the token ids: the vocabulary, the special tokens and the chat template."""
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    template = getattr(tok, "chat_template", None)
    return {"class": type(getattr(tok, "_tokenizer", tok)).__name__, "vocab_size": len(vocab),
            "vocab_hash": "sha256:" + h.hexdigest(), "bos_token": tok.bos_token,
            "eos_token_ids": sorted(tok.eos_token_ids),
            "chat_template_hash": "sha256:" + hashlib.sha256(template.encode()).hexdigest() if template else None}
