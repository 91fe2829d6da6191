"""The same harvest job on a local Ray instance (2 CPUs, two model replicas) writes exactly what
the local run writes: the same shards, row for row and byte for byte, and one manifest."""

from __future__ import annotations

import json

import pytest

from harvest.job import HarvestOptions, run_harvest
from harvest.store import MANIFEST
from tests.test_harvest import HOOKS, corpus, read_dir, write_jsonl

ray = pytest.importorskip("ray", reason="Ray is the optional extra nsbridge[ray]")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_run_equals_local_run(tiny_llama, local_ray, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(4))
    options = HarvestOptions(hooks=HOOKS[:3], context=64, shard_rows=60, batch_size=4)
    local = run_harvest(tiny_llama, src, tmp_path / "local", options, stream=None)
    seen = []
    remote = run_harvest(tiny_llama, src, tmp_path / "ray", options, stream=None, ray="auto", ray_workers=2,
                         after_shard=seen.append)
    assert len(local["shards"]) >= 4 and [e["file"] for e in seen] == [s["file"] for s in local["shards"]]
    assert read_dir(tmp_path / "ray").equals(read_dir(tmp_path / "local"))
    assert remote["shards"] == local["shards"]  # names, rows, bytes, checksums, documents covered
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted([MANIFEST] + [s["file"] for s in
                                                                            local["shards"]])
    assert json.loads((tmp_path / "ray" / MANIFEST).read_text())["tokens"] == local["tokens"]
