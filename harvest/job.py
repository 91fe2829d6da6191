"""One harvest job end to end: input file -> engine.harvest -> Parquet shards, resumable.

    from harvest.job import HarvestOptions, run_harvest
    manifest = run_harvest(lm, "docs.jsonl", "out/", HarvestOptions(hooks=["blocks.1.hook_resid_post"]))

Shards hold whole documents: a shard is written when the next document would take it past
`shard_rows` rows (a document longer than that gets a shard of its own). Within a shard,
documents of similar length share a forward (at most `batch_size` documents and `batch_tokens`
padded tokens a forward); since shard boundaries depend only on token counts, a resumed job
batches exactly as an uninterrupted one and writes the same bytes. `max_tokens` stops the job
after that many tokens; the document that crosses the budget is cut to fit (its prefix is run,
as a causal model would see it). With `shuffle` (a seed), the shards are first staged
unshuffled, then every row of the job is permuted across all shards (for SAE training, where
consecutive rows of one document are correlated).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

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
    shuffle: int | None = None  # seed: rows permuted across all shards
    batch_size: int = 16  # documents per forward at most
    batch_tokens: int = 4096  # padded tokens (documents x longest) per forward at most


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Meter:
    """The job's progress figures (tokens, tokens/s, bytes written, ETA), printed as engine.progress'
    line when there is a stream and handed to `on_progress` (the server's job status)."""

    def __init__(self, total: int, done: int, stream, on_progress: Callable[[dict], None] | None = None):
        self.progress = Progress("harvest", stream) if stream is not None else None
        self.on_progress = on_progress
        self.total, self.done, self.start_done = total, done, done
        self.t0 = time.perf_counter()
        self.bytes = 0
        if on_progress is not None:
            on_progress(self.figures())  # the total is known before the first forward

    def __call__(self, tokens: int = 0, written_bytes: int = 0) -> None:
        self.done += tokens
        self.bytes += written_bytes
        if self.on_progress is not None:
            self.on_progress(self.figures())
        if self.progress is None or self.done >= self.total:  # the final line: close(), after the last shard
            return
        self._print()

    def figures(self) -> dict:
        rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
        return {"tokens_done": self.done, "tokens_total": self.total, "tokens_per_s": round(rate, 1),
                "bytes_written": self.bytes,
                "eta_s": round((self.total - self.done) / rate, 1) if rate > 0 else None}

    def close(self) -> None:
        if self.progress is not None:
            self._print()

    def _print(self) -> None:
        f = self.figures()
        eta = _eta(f["eta_s"]) if f["eta_s"] is not None else "?"
        self.progress(self.done, self.total, f"{f['tokens_per_s']:,.0f} tok/s {self.bytes / 1e6:,.1f}MB eta {eta}")


def _counts() -> dict:
    return {"documents": 0, "skipped_empty": 0, "truncated": 0, "cut_by_budget": 0, "first_doc": None,
            "last_doc": None}


def plan_shards(harvester: Harvester, input_path: Path, first_doc: int, tokens_done: int, options: HarvestOptions,
                tail: dict) -> Iterator[tuple[list[tuple[int, list[int]]], dict]]:
    """The job's remaining shards, from document `first_doc` on: ([(doc_id, token ids)], the shard's
    entry info: counts, first_input_doc, next_doc). Boundaries depend only on token counts, so a
    resumed job cuts the same shards. Empty documents after the last shard are counted in `tail`."""
    budget = options.max_tokens
    docs: list[tuple[int, list[int]]] = []
    pending, first_input_doc, next_doc, rows = _counts(), first_doc, first_doc, 0
    for doc_id, where, record in read_documents(input_path):
        if doc_id < first_doc:
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
        if docs and rows + len(ids) > options.shard_rows:
            yield docs, {**pending, "first_input_doc": first_input_doc, "next_doc": doc_id}
            docs, pending, first_input_doc, rows = [], _counts(), doc_id, 0
        docs.append((doc_id, ids))
        rows += len(ids)
        tokens_done += len(ids)
        pending["documents"] += 1
        pending["truncated"] += cut
        pending["cut_by_budget"] += over_budget
        pending["first_doc"] = doc_id if pending["first_doc"] is None else pending["first_doc"]
        pending["last_doc"] = doc_id
    if docs:
        yield docs, {**pending, "first_input_doc": first_input_doc, "next_doc": next_doc}
    else:
        tail.update(pending)


def _direct(fn: Callable, *args):
    return fn(*args)


def run_harvest(lm: LoadedModel, input_path: str | Path, out: str | Path, options: HarvestOptions, *,
                stream=sys.stderr, after_shard: Callable[[dict], None] | None = None,
                call: Callable = _direct, on_progress: Callable[[dict], None] | None = None,
                ray: str | None = None, ray_workers: int | None = None) -> dict:
    """Run (or resume) a job; returns the manifest. Raises harvest.inputs.InputError,
    harvest.store.StoreError or engine.errors.InvalidArgument (bad hook, over-long document...)
    before writing anything for errors found in the input; `after_shard(entry)` is called once
    each shard is durable (tests use it to interrupt a job). `call(fn, *args)` runs each piece
    of MLX work (a forward; the weights hash): the server passes its exclusive worker queue.
    `on_progress(figures)` gets the Meter's figures after each forward and shard. `ray`: a Ray
    cluster's address ("auto": the one on this machine, or a new local instance) whose
    `ray_workers` actors (default: one per node) each load the model and write whole shards
    (harvest/ray_job.py); the output is the same, byte for byte."""
    input_path = Path(input_path)
    fmt = check_readable(input_path)
    for name in ("shard_rows", "batch_size", "batch_tokens"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be at least 1")
    if options.max_tokens is not None and options.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    context = options.context if options.context is not None else min(1024, lm.info.context_length)
    harvester = Harvester(lm, options.hooks, context=context, truncate=options.truncate, dtype=options.dtype)
    tokenizer = tokenizer_description(lm)
    job = {
        "model_id": lm.info.model_id, "weights_hash": call(weights_hash, lm),
        "tokenizer_vocab_hash": tokenizer["vocab_hash"], "chat_template_hash": tokenizer["chat_template_hash"],
        "input_sha256": file_sha256(input_path), "hooks": harvester.hook_names,
        **{k: v for k, v in asdict(options).items() if k != "hooks"}, "context": context,
        # False where the model's cache or a hook rules out batching (one document per forward)
        "batched": harvester.batched,
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

    meter = Meter(total, state.tokens, stream, on_progress)
    staged = options.shuffle is not None
    tail = _counts()  # empty documents after the last shard
    shards = plan_shards(harvester, input_path, state.next_doc, state.tokens, options, tail)
    if ray is None:
        for docs, info in shards:
            batches = harvester.rows(docs, batch_size=options.batch_size, batch_tokens=options.batch_tokens,
                                     call=call, after_forward=meter)
            table = pa.Table.from_batches(batches, schema=harvester.schema)
            entry = store.write_shard(table, info, staged=staged)
            meter(0, 0 if staged else entry["bytes"])
            if after_shard is not None:
                after_shard(entry)
    else:
        from harvest.ray_job import run_on_ray

        run_on_ray(ray, lm, store, shards, options, context, staged, meter, after_shard, ray_workers)
    done = store.state.shards  # the finished shards (staged ones, for a shuffled job)
    final = None
    if staged:
        final = store.write_shuffled(options.shuffle, options.shard_rows,
                                     after_shard=lambda e: (meter(0, e["bytes"]), after_shard and after_shard(e)))
    meter.close()
    return store.finish({
        "model": {"id": lm.info.model_id, "weights_hash": job["weights_hash"], "architecture": lm.info.architecture,
                  "source": lm.info.source, "n_layers": lm.info.n_layers, "d_model": lm.info.d_model},
        "tokenizer": tokenizer,
        "input": {"path": str(input_path), "format": fmt, "sha256": job["input_sha256"]},
        "hooks": harvester.hooks_description(),
        "dtype": options.dtype, "context": context, "truncate": options.truncate, "shard_rows": options.shard_rows,
        "max_tokens": options.max_tokens, "batch_size": options.batch_size if harvester.batched else 1,
        "batch_tokens": options.batch_tokens,
        "shuffle": None if not staged else {"seed": options.shuffle, "scope": "rows permuted across all shards"},
        "columns": {"doc_id": "index of the document in the input (0-based; blank JSONL lines not counted)",
                    "position": "token position in the document", "token_id": "the token",
                    "<hook>": "fixed-size list: the token's tensor flattened row-major, shape in hooks[].shape"},
        "tokens": sum(s["rows"] for s in done),
        "documents": sum(s["documents"] for s in done),
        # documents with no tokens (empty text) after the last shard are counted here too
        "skipped_empty_documents": sum(s["skipped_empty"] for s in done) + tail["skipped_empty"],
        "truncated_documents": sum(s["truncated"] for s in done),
        "documents_cut_by_max_tokens": sum(s["cut_by_budget"] for s in done),
    }, final)
