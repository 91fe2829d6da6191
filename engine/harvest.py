"""Harvesting: documents in, one Arrow record batch of activations per document out.

A harvest runs prefill-only forwards (no generation, no sampled token) with the same `Capture`
the server captures with. Documents of similar length share a forward, right-padded into one
[B, T] batch; a document alone in its forward gives exactly what `Model.generate(prompt=...,
hooks=..., max_tokens=1)` returns for the prompt's positions, one in a batch the same values up
to float32 rounding (measured: at most ~1e-5 absolute on unit-scale activations). One
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
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

import engine  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import KVCache

from engine.capture import BatchCapture, Capture
from engine.errors import ContextLengthExceeded, InvalidArgument
from engine.generate import Forward, capture_cache
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
    return _columns(capture, key_pad_to)


def _columns(capture: Capture, key_pad_to: int | None) -> dict[str, np.ndarray]:
    """A prompt's capture as column name -> [T, *per_token] token-major numpy arrays."""
    names = column_names([(r.hook_id, r.is_input) for r in capture.records])
    out = {}
    for name, rec in zip(names, capture.records):
        pad = key_pad_to if COMPONENTS[rec.component].key_pad is not None else None
        out[name] = stack_token_major(rec.component, [s.array for s in rec.steps], key_pad_to=pad)
    return out


def plain_cache(lm: LoadedModel) -> list | None:
    """A fresh KV cache for one batched prefill, as `Forward` builds it for a capture (a rotating
    cache becomes a full one); None when some layer's cache is not a plain KV cache (SSM or
    other state), where the harvest runs one document per forward."""
    cache = capture_cache(lm.model)
    return cache if all(type(c) is KVCache for c in cache) else None


def can_batch(lm: LoadedModel, targets: list[HookTarget]) -> bool:
    """Whether documents may share a forward: plain KV caches, and no router capture (olmoe's
    router sees the batch's tokens flattened, so rows cannot be told apart)."""
    return plain_cache(lm) is not None and all(t.component != "router" for t in targets)


def capture_batch(lm: LoadedModel, docs: list[list[int]], targets: list[HookTarget], dtype: str = "float32",
                  key_pad_to: int | None = None) -> list[dict[str, np.ndarray]]:
    """One prefill-only forward over several documents, right-padded into one [B, T] batch;
    per document, what `capture_prompt` returns for it alone. A causal model's real positions
    never attend to the padding after them, so no mask is needed; the values equal the
    unbatched capture up to float rounding (a matmul over B*T rows may sum in another order)."""
    if len(docs) == 1:
        return [capture_prompt(lm, docs[0], targets, dtype, key_pad_to)]
    lengths = [len(d) for d in docs]
    width = max(lengths)
    tokens = mx.array([d + [d[-1]] * (width - len(d)) for d in docs])  # any token pads: it is never attended to
    # One Capture per document; BatchCapture hands each its own row and tokens (a chat batch's
    # prompts join the same way: engine/batch.py).
    captures = [Capture(lm, list(targets), CaptureOptions(dtype=dtype)) for _ in docs]
    for capture in captures:
        capture.begin_step(0, 0)
    with BatchCapture(list(enumerate(captures)), lengths, [slice(0, n) for n in lengths]).installed():
        lm.model(tokens, cache=plain_cache(lm))  # the logits stay lazy: never computed
    mx.eval(*(a for capture in captures for a in capture.end_step()))
    return [_columns(capture, key_pad_to) for capture in captures]


# A group's longest document at most this many times its shortest: padding is computed and thrown
# away, and on a CPU a forward costs about its padded token count, so a little batching gain is not
# worth much padding (documents of 100 and 112 tokens share a forward; of 100 and 200 they do not).
MAX_LENGTH_RATIO = 1.125


def length_groups(lengths: list[int], max_batch: int, batch_tokens: int) -> list[list[int]]:
    """Indices of documents grouped for batched forwards: sorted by length (ties in input order),
    consecutive documents while the group has at most `max_batch` of them, its padded size
    (count x longest) stays within `batch_tokens` and its longest is at most MAX_LENGTH_RATIO
    times its shortest (a document over `batch_tokens` goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and len(g) < max_batch and (len(g) + 1) * lengths[i] <= batch_tokens \
                and lengths[i] <= MAX_LENGTH_RATIO * lengths[g[0]]:
            g.append(i)
        else:
            groups.append([i])
    return groups


class Harvester:
    """Tokenizes documents and turns them into record batches (one per document, rows = its tokens)."""

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
        self.batched = can_batch(lm, self.targets)
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

    def record_batch(self, doc_id: int, token_ids: list[int], arrays: dict[str, np.ndarray]) -> pa.RecordBatch:
        """The document's rows from its captured arrays (`capture_batch`'s per-document dict)."""
        n = len(token_ids)
        cols: list[pa.Array] = [pa.array(np.full(n, doc_id, np.int64)), pa.array(np.arange(n, dtype=np.int32)),
                                pa.array(np.asarray(token_ids, np.int32))]
        for c in self.columns:
            a = np.ascontiguousarray(arrays[c.name], dtype=_NP[self.dtype]).reshape(n, c.size)
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), c.size))
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def rows(self, docs: list[tuple[int, list[int]]], *, batch_size: int, batch_tokens: int,
             call: Callable = lambda fn, *args: fn(*args),
             after_forward: Callable[[int], None] | None = None) -> list[pa.RecordBatch]:
        """Every document's rows, in the order given: documents of similar length share a forward
        (`length_groups`). `call(fn, *args)` runs each forward (the server passes its exclusive
        MLX queue); `after_forward(tokens)` reports each one's real tokens."""
        if not self.batched:
            batch_size = 1
        out: list[pa.RecordBatch | None] = [None] * len(docs)
        for group in length_groups([len(ids) for _, ids in docs], batch_size, batch_tokens):
            ids = [docs[i][1] for i in group]
            arrays = call(capture_batch, self.lm, ids, self.targets, self.dtype, self.context)
            for i, a in zip(group, arrays):
                out[i] = self.record_batch(docs[i][0], docs[i][1], a)
            if after_forward is not None:
                after_forward(sum(map(len, ids)))
        return out


_HASHES: dict[int, tuple[weakref.ref, str]] = {}  # id(model) -> (the model, its hash): a job, or a resume, hashes once


def weights_hash(lm: LoadedModel) -> str:
    """sha256 over every parameter (name, dtype, shape, bytes), in name order: the same numbers
    give the same hash, whichever file they were loaded from."""
    known = _HASHES.get(id(lm.model))
    if known is not None and known[0]() is lm.model:
        return known[1]
    digest = _weights_hash(lm)
    _HASHES[id(lm.model)] = (weakref.ref(lm.model), digest)
    return digest


def _weights_hash(lm: LoadedModel) -> str:
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
