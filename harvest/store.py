"""The output directory of a harvest: Parquet shards, a progress file, and the manifest.

    DIR/shard-00000.parquet ...   one row per token (see engine/harvest.py for the columns)
    DIR/_progress.json            while the job runs: the job's identity and the finished shards
    DIR/_manifest.json            written last, when the job is complete
    DIR/_stage-00000.arrow ...    shuffled jobs only, while they run: the unshuffled shards (Arrow
                                  IPC files, memory-mapped by the final pass that writes the
                                  shuffled Parquet shards), deleted after the manifest

Every file appears atomically: written under a hidden temporary name (`.tmp-...`), fsynced,
renamed, and the directory fsynced. A shard is listed in `_progress.json` only once it is
durable, so after a crash (Ctrl-C, kill -9, power loss) a restart keeps the listed shards,
deletes temporary files and any shard written but not yet listed, and goes on from the first
document the listed shards do not cover. pyarrow.dataset, pandas and other readers skip files
whose names start with `_` or `.`, so the directory reads as just its complete shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "nsbridge.harvest/1"
MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
TMP_PREFIX = ".tmp-"
STAGE_PREFIX = "_stage-"


class StoreError(Exception):
    """The output directory cannot be used for this job."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def stage_name(index: int) -> str:
    return f"{STAGE_PREFIX}{index:05d}.arrow"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the previous version stays
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass
class State:
    """What a restart finds: the finished shards (as listed in the progress file), the first
    document they do not cover, and the manifest when the job is already complete."""

    shards: list[dict] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def next_doc(self) -> int:
        return self.shards[-1]["next_doc"] if self.shards else 0

    @property
    def tokens(self) -> int:
        return sum(s["rows"] for s in self.shards)


class ShardStore:
    """One job's output directory. `job` is the job's identity (model, weights hash, input hash,
    hooks, options): a directory holding another job is refused, never mixed."""

    def __init__(self, out: Path, job: dict):
        self.out = Path(out)
        self.job = job
        self.state = State()

    def open(self) -> State:
        out = self.out
        if out.exists() and not out.is_dir():
            raise StoreError(f"{out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        manifest_path, progress_path = out / MANIFEST, out / PROGRESS
        if manifest_path.exists():
            manifest = self._read(manifest_path)
            self._same_job(manifest.get("job"), manifest_path)
            self.state = State(shards=list(manifest["shards"]), manifest=manifest)
            self._drop_stage()  # a shuffled job stopped after its manifest, before this cleanup
            return self.state
        if progress_path.exists():
            progress = self._read(progress_path)
            self._same_job(progress.get("job"), progress_path)
            self.state = State(shards=list(progress["shards"]))
        else:
            stray = [p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)]
            if stray:
                raise StoreError(f"{out} is not empty and holds no harvest in progress ({', '.join(sorted(stray)[:5])}"
                                 f"{', ...' if len(stray) > 5 else ''}); give a new or empty --out directory")
            # The job's identity is on disk before its first shard, so a job stopped between that
            # shard's rename and its listing is still recognised (and the shard redone).
            write_json_atomic(progress_path, {"format": FORMAT, "job": self.job, "shards": []})
        listed = {s["file"] for s in self.state.shards}
        for p in out.iterdir():  # half-written files, and shards written but never listed
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(("shard-", STAGE_PREFIX)) and p.name not in listed):
                p.unlink()
        for s in self.state.shards:
            path = out / s["file"]
            if not path.exists() or path.stat().st_size != s["bytes"]:
                raise StoreError(f"{path} is listed in {PROGRESS} but is missing or has another size; the "
                                 "directory was changed by something else: start again in a new directory")
        return self.state

    def write_shard(self, table: pa.Table, info: dict, staged: bool = False) -> dict:
        """Write the next shard durably, then list it in the progress file; returns its entry.
        `staged`: an unshuffled Arrow IPC shard for `write_shuffled`, hidden from readers."""
        return self.add({**self.write_file(len(self.state.shards), table, staged), **info})

    def write_file(self, index: int, table: pa.Table, staged: bool = False) -> dict:
        """Write shard `index` durably without listing it (a Ray worker's part; the driver lists
        it with `add`); returns its file entry."""
        return self._write(stage_name(index) if staged else shard_name(index), table, ipc=staged)

    def add(self, entry: dict) -> dict:
        """List the next shard, already on disk, in the progress file."""
        expected = (stage_name if entry["file"].startswith(STAGE_PREFIX) else shard_name)(len(self.state.shards))
        if entry["file"] != expected:
            raise StoreError(f"shard {entry['file']} listed out of order (expected {expected})")
        self.state.shards.append(entry)
        write_json_atomic(self.out / PROGRESS, {"format": FORMAT, "job": self.job, "shards": self.state.shards})
        return entry

    def write_shuffled(self, seed: int, shard_rows: int, after_shard=None) -> list[dict]:
        """The staged shards' rows, permuted with `seed` across the whole job, as Parquet shards of
        `shard_rows` rows; returns their entries. Only one output shard's rows are in memory at a
        time (the staged files are memory-mapped). Deterministic, so a job stopped here redoes it."""
        tables = [pa.ipc.open_file(pa.memory_map(str(self.out / s["file"]))).read_all() for s in self.state.shards]
        starts = np.cumsum([0] + [t.num_rows for t in tables])
        order = np.random.default_rng(seed).permutation(int(starts[-1]))
        entries = []
        for j, first in enumerate(range(0, len(order), shard_rows)):
            want = order[first:first + shard_rows]
            src = np.searchsorted(starts, want, side="right") - 1  # staged shard of each row
            by_src = np.argsort(src, kind="stable")
            parts = [tables[k].take(pa.array(want[by_src][src[by_src] == k] - starts[k])) for k in np.unique(src)]
            rows = pa.concat_tables(parts).take(pa.array(np.argsort(by_src)))  # back into permuted order
            entries.append(self._write(shard_name(j), rows, ipc=False))
            if after_shard is not None:
                after_shard(entries[-1])
        return entries

    def _write(self, name: str, table: pa.Table, ipc: bool) -> dict:
        """Write `name` atomically (temporary file, fsync, rename, directory fsync)."""
        final, tmp = self.out / name, self.out / (TMP_PREFIX + name)
        try:
            with open(tmp, "wb") as f:
                if ipc:
                    with pa.ipc.new_file(f, table.schema) as writer:
                        writer.write_table(table)
                else:
                    pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            checksum = file_sha256(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {"file": name, "rows": table.num_rows, "bytes": final.stat().st_size, "sha256": checksum}

    def finish(self, manifest: dict, shards: list[dict] | None = None) -> dict:
        """Write `_manifest.json` (the job and the shard list added: `shards`, default the
        finished ones), then drop the progress file and any staged shards."""
        manifest = {"format": FORMAT, **manifest, "job": self.job,
                    "shards": self.state.shards if shards is None else shards}
        write_json_atomic(self.out / MANIFEST, manifest)
        (self.out / PROGRESS).unlink(missing_ok=True)
        self._drop_stage()
        _fsync_dir(self.out)
        self.state = State(shards=manifest["shards"], manifest=manifest)
        return manifest

    def _drop_stage(self) -> None:
        for p in self.out.iterdir():
            if p.name.startswith(STAGE_PREFIX):
                p.unlink()

    def _read(self, path: Path) -> dict:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise StoreError(f"{path} is not an nsbridge harvest file ({FORMAT})")
        return value

    def _same_job(self, job: Any, path: Path) -> None:
        if job == self.job:
            return
        diff = sorted(k for k in set(self.job) | set(job or {}) if (job or {}).get(k) != self.job.get(k))
        raise StoreError(f"{self.out} holds another harvest ({path.name} differs in: {', '.join(diff)}); "
                         "rerun with the same arguments to resume it, or give a new --out directory")
