"""One harvest job end to end: input file -> engine.harvest -> Parquet shards, resumable.

    from harvest.job import HarvestOptions, run_harvest
    manifest = run_harvest(lm, "docs.jsonl", "out/", HarvestOptions(hooks=["blocks.1.hook_resid_post"]))

Shards hold whole documents: a shard is written when the next document would take it past
`shard_rows` rows (a document longer than that gets a shard of its own). With `shuffle`,
the rows of each shard are permuted (seeded by the seed and the shard's index); documents
are not moved between shards. `max_tokens` stops the job after that many tokens; the document
that crosses the budget is cut to fit (its prefix is run, as a causal model would see it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from engine.harvest import Harvester, tokenizer_description, weights_hash
from engine.model import LoadedModel
from engine.progress import Progress
from harvest.inputs import check_readable, read_documents
from harvest.store import ShardStore, file_sha256


@dataclass
class HarvestOptions:
    hooks: list[str] = field(default_factory=list)
    context: int | None = None  # default: min(1024, the model's context length)
    truncate: bool = False
    dtype: str = "float32"
    shard_rows: int = 65536
    max_tokens: int | None = None
    shuffle: int | None = None  # seed: rows shuffled within each shard


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Line:
    """engine.progress' line over tokens, labelled with tokens/s, MB written and the ETA."""

    def __init__(self, total: int, done: int, stream):
        self.progress = Progress("harvest", stream) if stream is not None else None
        self.total, self.done, self.start_done = total, done, done
        self.t0 = time.perf_counter()
        self.mb = 0.0

    def __call__(self, tokens: int = 0, written_bytes: int = 0) -> None:
        self.done += tokens
        self.mb += written_bytes / 1e6
        if self.progress is None or self.done >= self.total:  # the final line: close(), after the last shard
            return
        self._print()

    def close(self) -> None:
        if self.progress is not None:
            self._print()

    def _print(self) -> None:
        rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
        eta = _eta((self.total - self.done) / rate) if rate > 0 else "?"
        self.progress(self.done, self.total, f"{rate:,.0f} tok/s {self.mb:,.1f}MB eta {eta}")


def _counts() -> dict:
    return {"documents": 0, "skipped_empty": 0, "truncated": 0, "cut_by_budget": 0, "first_doc": None,
            "last_doc": None}


def run_harvest(lm: LoadedModel, input_path: str | Path, out: str | Path, options: HarvestOptions, *,
                stream=sys.stderr, after_shard: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a job; returns the manifest. Raises harvest.inputs.InputError,
    harvest.store.StoreError or engine.errors.InvalidArgument (bad hook, over-long document...)
    before writing anything for errors found in the input; `after_shard(entry)` is called once
    each shard is durable (tests use it to interrupt a job)."""
    input_path = Path(input_path)
    fmt = check_readable(input_path)
    if options.shard_rows < 1:
        raise ValueError("shard_rows must be at least 1")
    if options.max_tokens is not None and options.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    context = options.context if options.context is not None else min(1024, lm.info.context_length)
    harvester = Harvester(lm, options.hooks, context=context, truncate=options.truncate, dtype=options.dtype)
    tokenizer = tokenizer_description(lm)
    job = {
        "model_id": lm.info.model_id, "weights_hash": weights_hash(lm), "tokenizer_vocab_hash": tokenizer["vocab_hash"],
        "chat_template_hash": tokenizer["chat_template_hash"], "input_sha256": file_sha256(input_path),
        "hooks": harvester.hook_names, **{k: v for k, v in asdict(options).items() if k != "hooks"}, "context": context,
    }
    store = ShardStore(Path(out), job)
    state = store.open()
    if state.manifest is not None:
        if stream is not None:
            stream.write(f"harvest: {out} is already complete ({state.manifest['tokens']} tokens)\n")
        return state.manifest

    # Pass 1: tokenize everything (errors before any forward; the total for the ETA).
    total, budget = 0, options.max_tokens
    for doc_id, where, record in read_documents(input_path):
        n = len(harvester.tokenize(record, where)[0])
        total += n if budget is None else min(n, budget - total)
        if budget is not None and total >= budget:
            break

    line = _Line(total, state.tokens, stream)
    tokens_done = state.tokens
    buffer: list[pa.RecordBatch] = []
    pending = _counts()
    first_input_doc = state.next_doc

    def flush(next_doc: int) -> None:
        nonlocal buffer, pending, first_input_doc
        table = pa.Table.from_batches(buffer, schema=harvester.schema)
        if options.shuffle is not None:
            rng = np.random.default_rng([options.shuffle, len(store.state.shards)])
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        entry = store.write_shard(table, {**pending, "first_input_doc": first_input_doc, "next_doc": next_doc})
        line(0, entry["bytes"])
        buffer, first_input_doc = [], next_doc
        pending = _counts()
        if after_shard is not None:
            after_shard(entry)

    next_doc = state.next_doc
    rows = 0
    for doc_id, where, record in read_documents(input_path):
        if doc_id < state.next_doc:
            continue
        if budget is not None and tokens_done >= budget:
            break
        ids, cut = harvester.tokenize(record, where)
        next_doc = doc_id + 1
        if not ids:
            pending["skipped_empty"] += 1
            continue
        over_budget = budget is not None and len(ids) > budget - tokens_done
        if over_budget:
            ids = ids[: budget - tokens_done]
        if buffer and rows + len(ids) > options.shard_rows:
            flush(doc_id)
            rows = 0
        buffer.append(harvester.batch(doc_id, ids))
        rows += len(ids)
        tokens_done += len(ids)
        pending["documents"] += 1
        pending["truncated"] += cut
        pending["cut_by_budget"] += over_budget
        pending["first_doc"] = doc_id if pending["first_doc"] is None else pending["first_doc"]
        pending["last_doc"] = doc_id
        line(len(ids))
    if buffer:
        flush(next_doc)
    line.close()

    shards = store.state.shards
    return store.finish({
        "model": {"id": lm.info.model_id, "weights_hash": job["weights_hash"], "architecture": lm.info.architecture,
                  "source": lm.info.source, "n_layers": lm.info.n_layers, "d_model": lm.info.d_model},
        "tokenizer": tokenizer,
        "input": {"path": str(input_path), "format": fmt, "sha256": job["input_sha256"]},
        "hooks": harvester.hooks_description(),
        "dtype": options.dtype, "context": context, "truncate": options.truncate, "shard_rows": options.shard_rows,
        "max_tokens": options.max_tokens,
        "shuffle": None if options.shuffle is None else {"seed": options.shuffle, "scope": "rows within each shard"},
        "columns": {"doc_id": "index of the document in the input (0-based; blank JSONL lines not counted)",
                    "position": "token position in the document", "token_id": "the token",
                    "<hook>": "fixed-size list: the token's tensor flattened row-major, shape in hooks[].shape"},
        "tokens": sum(s["rows"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        # documents with no tokens (empty text) after the last shard are counted here too
        "skipped_empty_documents": sum(s["skipped_empty"] for s in shards) + pending["skipped_empty"],
        "truncated_documents": sum(s["truncated"] for s in shards),
        "documents_cut_by_max_tokens": sum(s["cut_by_budget"] for s in shards),
    })
