"""The same harvest job on a Ray cluster (`nsbridge harvest ... --ray ADDRESS`; `pip install nsbridge[ray]`).

Ray Data runs the forwards: `map_batches` over the job's shards with one model replica per
actor; each actor writes whole shards into the output directory. The driver plans the shards
exactly as a local run does (`harvest.job.plan_shards`: whole documents, boundaries from token
counts), sends each shard's token ids to an actor, and lists the finished shards in the
progress file in order, then writes the one manifest; so the output, and a resume after a
crash, is the local run's, byte for byte.

On a cluster of machines every node needs nsbridge installed, the model at the same path (or
"default", fetched on each node with `nsbridge fetch-default`), and the output directory on a
filesystem all nodes share (NFS, a mounted bucket). Each actor checks that its weights hash to
the job's before it writes anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa

from harvest.store import ShardStore

ROOT = Path(__file__).resolve().parent.parent


class ShardWriter:
    """A Ray Data actor: one model replica; each batch row is one shard to compute and write."""

    def __init__(self, model: str, model_id: str, weights: str, hooks: list[str], context: int, truncate: bool,
                 dtype: str, batch_size: int, batch_tokens: int, out: str, staged: bool):
        import engine
        from engine.harvest import Harvester, weights_hash

        lm = engine.load(model, model_id).lm
        if weights_hash(lm) != weights:
            raise RuntimeError(f"the model at {model} on this node has other weights than the job's ({weights}); "
                               "every node needs the same model")
        self.harvester = Harvester(lm, hooks, context=context, truncate=truncate, dtype=dtype)
        self.batch_size, self.batch_tokens, self.staged = batch_size, batch_tokens, staged
        self.store = ShardStore(Path(out), job={})  # only writes files; the driver lists them

    def __call__(self, batch: dict) -> dict:
        entries, tokens = [], []
        for index, docs in zip(batch["index"], batch["docs"]):
            docs = [(int(d), list(ids)) for d, ids in json.loads(docs)]
            rows = self.harvester.rows(docs, batch_size=self.batch_size, batch_tokens=self.batch_tokens)
            table = pa.Table.from_batches(rows, schema=self.harvester.schema)
            entries.append(json.dumps(self.store.write_file(int(index), table, self.staged)))
            tokens.append(table.num_rows)
        return {"index": batch["index"], "info": batch["info"], "entry": entries, "tokens": tokens}


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}  # replicas on different nodes where there are several


def connect(address: str) -> None:
    """Join the cluster at `address` ("auto": the one running on this machine, else a new local
    instance); nothing to do when this process already joined one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "auto" else address, log_to_driver=False)


def run_on_ray(address: str, lm, store: ShardStore, shards: Iterable, options, context: int, staged: bool,
               meter: Callable, after_shard: Callable | None, workers: int | None) -> None:
    """Compute and write `shards` (plan_shards' output) on the cluster; list each in `store` in order."""
    import ray

    from engine.default_model import default_model_dir

    connect(address)
    first = len(store.state.shards)
    items = [{"index": first + i, "docs": json.dumps(docs), "info": json.dumps(info)}
             for i, (docs, info) in enumerate(shards)]
    if not items:
        return
    n = workers or max(1, sum(1 for node in ray.nodes() if node.get("Alive")))  # default: one replica per node
    source = Path(lm.info.source)
    model = "default" if source.exists() and source.resolve() == default_model_dir().resolve() else str(source)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards come back in order
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ShardWriter, batch_size=1, concurrency=min(n, len(items)), num_cpus=1,
        fn_constructor_kwargs=dict(model=model, model_id=lm.info.model_id, weights=store.job["weights_hash"],
                                   hooks=list(options.hooks), context=context, truncate=options.truncate,
                                   dtype=options.dtype, batch_size=options.batch_size,
                                   batch_tokens=options.batch_tokens, out=str(store.out.resolve()), staged=staged),
        # a checkout that is not pip-installed: the workers import it from here (a local cluster)
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                                if p)}},
        ray_remote_args_fn=_spread)
    for row in ds.iter_rows():
        entry = store.add({**json.loads(row["entry"]), **json.loads(row["info"])})
        meter(int(row["tokens"]), 0 if staged else entry["bytes"])
        if after_shard is not None:
            after_shard(entry)
