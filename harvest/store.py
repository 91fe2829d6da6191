"""The output directory of a harvest: Parquet shards, a progress file, and the manifest.

    DIR/shard-00000.parquet ...   one row per token (see engine/harvest.py for the columns)
    DIR/_progress.json            while the job runs: the job's identity and the finished shards
    DIR/_manifest.json            written last, when the job is complete

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

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "nsbridge.harvest/1"
MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
TMP_PREFIX = ".tmp-"


class StoreError(Exception):
    """The output directory cannot be used for this job."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


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
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith("shard-") and p.name not in listed):
                p.unlink()
        for s in self.state.shards:
            path = out / s["file"]
            if not path.exists() or path.stat().st_size != s["bytes"]:
                raise StoreError(f"{path} is listed in {PROGRESS} but is missing or has another size; the "
                                 "directory was changed by something else: start again in a new directory")
        return self.state

    def write_shard(self, table: pa.Table, info: dict) -> dict:
        """Write the next shard durably, then list it in the progress file; returns its entry."""
        name = shard_name(len(self.state.shards))
        final, tmp = self.out / name, self.out / (TMP_PREFIX + name)
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            checksum = file_sha256(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entry = {"file": name, "rows": table.num_rows, "bytes": final.stat().st_size, "sha256": checksum, **info}
        self.state.shards.append(entry)
        write_json_atomic(self.out / PROGRESS, {"format": FORMAT, "job": self.job, "shards": self.state.shards})
        return entry

    def finish(self, manifest: dict) -> dict:
        """Write `_manifest.json` (the job and the shard list added), then drop the progress file."""
        manifest = {"format": FORMAT, **manifest, "job": self.job, "shards": self.state.shards}
        write_json_atomic(self.out / MANIFEST, manifest)
        (self.out / PROGRESS).unlink(missing_ok=True)
        _fsync_dir(self.out)
        self.state.manifest = manifest
        return manifest

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
