"""`nsbridge harvest`: activations of every token of a corpus into Parquet shards (tiny llama).

Every harvested value must equal what the engine API captures for the same document, position
and hook; the directory must open with pandas and pyarrow.dataset at their defaults; an
interrupted job (an exception, Ctrl-C, kill -9) must resume into exactly the rows an
uninterrupted run writes; bad input must fail clearly before any shard is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from control.cli import main as cli_main
from harvest.job import HarvestOptions, run_harvest
from harvest.store import MANIFEST, PROGRESS, file_sha256

ROOT = Path(__file__).resolve().parent.parent

HOOKS = ["blocks.1.hook_resid_post", "model.layers.0:attention_pattern", "blocks.2.attn.hook_q", "hook_embed",
         "transformer.h.1:mlp"]
TEXTS = ["The capital of France is Paris.", "John gave Mary the book because she asked for it.",
         "Hello, how are you? I am fine, thank you! 0123456789", "The answer is 42.",
         "The capital of Italy is Rome. " * 3]
CHATS = [[{"role": "user", "content": "What is the answer?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]]


def write_jsonl(path: Path, records: list[dict], blank_lines: bool = False) -> Path:
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if blank_lines and i % 3 == 0:
                f.write("\n")
    return path


def corpus(n: int = 1) -> list[dict]:
    docs = [{"text": t} for t in TEXTS] + [{"messages": m} for m in CHATS]
    return (docs * n)[: max(n, 1) * len(docs)]


def read_dir(out: Path) -> pa.Table:
    """Every row, in shard order then row order (what a reader sees, row for row)."""
    manifest = json.loads((out / MANIFEST).read_text())
    return pa.concat_tables([pq.read_table(out / s["file"]) for s in manifest["shards"]])


def sorted_rows(table: pa.Table) -> pa.Table:
    return table.sort_by([("doc_id", "ascending"), ("position", "ascending")])


def hook_arg(name: str) -> dict:
    layer, sep, component = name.partition(":")
    return {"layer_name": layer, "component": component or None, "hook_id": name}


def engine_rows(model, doc: dict | list[int], hooks: list[str], dtype: str = "float32") -> tuple[list[int], dict]:
    """What the engine API captures for a document: Model.generate with max_tokens=1, the prompt's rows."""
    kwargs = {"messages": doc["messages"]} if isinstance(doc, dict) and "messages" in doc else \
        {"prompt": doc if isinstance(doc, list) else doc["text"]}
    out = model.generate(**kwargs, hooks=[hook_arg(h) for h in hooks], max_tokens=1, temperature=0, dtype=dtype)
    n = out.prompt_tokens
    return out.token_ids[:n], {k: v[:n] for k, v in out.activations.items()}


@pytest.fixture(scope="module")
def model(tiny_llama):
    from engine.api import Model

    return Model(tiny_llama)


def check_against_engine(model, table: pa.Table, docs: dict[int, dict | list[int]], hooks: list[str], context: int,
                         dtype: str = "float32") -> None:
    manifest_shapes = {}
    for h in hooks:
        meta = table.schema.field(h).metadata
        manifest_shapes[h] = json.loads(meta[b"nsbridge.shape"])
    for doc_id, doc in docs.items():
        rows = table.filter(pc.equal(table["doc_id"], doc_id))
        rows = rows.sort_by("position")
        ids, ref = engine_rows(model, doc, hooks, dtype)
        n = len(ids)
        assert rows.num_rows == n, doc_id
        assert rows["position"].to_pylist() == list(range(n))
        assert rows["token_id"].to_pylist() == ids
        for h in hooks:
            shape = manifest_shapes[h]
            got = rows[h].combine_chunks().flatten().to_numpy().reshape(n, *shape)
            want = ref[h]
            assert got.dtype == np.dtype(dtype), h
            if h.endswith("attention_pattern"):
                assert shape[-1] == context
                assert np.array_equal(got[..., :n], want[..., :n]), h
                assert not got[..., n:].any(), h  # keys never seen: probability 0
            else:
                assert np.array_equal(got, want), (h, doc_id)


def test_values_equal_engine_capture(model, tiny_llama, tmp_path):
    docs = corpus()
    src = write_jsonl(tmp_path / "docs.jsonl", docs, blank_lines=True)
    manifest = run_harvest(tiny_llama, src, tmp_path / "out", HarvestOptions(hooks=HOOKS, context=64, shard_rows=40),
                           stream=None)
    assert len(manifest["shards"]) > 2
    table = read_dir(tmp_path / "out")
    assert manifest["tokens"] == table.num_rows and manifest["documents"] == len(docs)
    check_against_engine(model, table, dict(enumerate(docs)), HOOKS, 64)


def test_readers_open_it_and_manifest(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(2))
    out = tmp_path / "out"
    manifest = run_harvest(tiny_llama, src, out, HarvestOptions(hooks=HOOKS[:2], context=64, shard_rows=50),
                           stream=None)
    dataset = pads.dataset(out)
    assert dataset.count_rows() == manifest["tokens"]
    assert dataset.schema.names == ["doc_id", "position", "token_id", *HOOKS[:2]]
    try:  # pandas is not a dependency of the project; where it is installed, it must open the directory
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        df = pd.read_parquet(out)
        assert len(df) == manifest["tokens"] and list(df.columns) == dataset.schema.names
        assert len(df["blocks.1.hook_resid_post"].iloc[0]) == 64
    assert sorted(f.name for f in out.iterdir()) == sorted([MANIFEST] + [s["file"] for s in manifest["shards"]])
    for s in manifest["shards"]:
        assert s["sha256"] == file_sha256(out / s["file"]) and s["rows"] <= 50
    assert manifest["model"]["weights_hash"].startswith("sha256:") and manifest["dtype"] == "float32"
    assert [h["name"] for h in manifest["hooks"]] == HOOKS[:2]
    assert manifest["hooks"][1]["shape"] == [4, 64]
    assert manifest["documents"] == len(corpus(2)) and manifest["tokens"] == sum(s["rows"] for s in manifest["shards"])
    # each shard holds whole documents, in input order
    docs = [pq.read_table(out / s["file"])["doc_id"].to_pylist() for s in manifest["shards"]]
    assert all(a[-1] < b[0] for a, b in zip(docs, docs[1:]))
    for d in ("duckdb", "polars"):  # only where installed; not dependencies
        try:
            mod = __import__(d)
        except ImportError:
            continue
        if d == "polars":
            assert len(mod.read_parquet(str(out / "*.parquet"))) == manifest["tokens"]
        else:
            assert mod.sql(f"select count(*) from '{out}/*.parquet'").fetchone()[0] == manifest["tokens"]


def test_float16_parquet_and_messages(model, tiny_llama, tmp_path):
    docs = corpus()
    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [d.get("text") for d in docs],
                             "messages": [d.get("messages") for d in docs]}), src)
    run_harvest(tiny_llama, src, tmp_path / "out", HarvestOptions(hooks=HOOKS[:3], context=64, dtype="float16"),
                stream=None)
    table = read_dir(tmp_path / "out")
    assert table.schema.field(HOOKS[0]).type.value_type == pa.float16()
    check_against_engine(model, table, dict(enumerate(docs)), HOOKS[:3], 64, dtype="float16")


def test_truncate_max_tokens_shuffle_and_empty(model, tiny_llama, tmp_path):
    long = {"text": "The capital of France is Paris. " * 20}
    docs = [{"text": "Hello"}, {"text": ""}, long, {"text": "The answer is 42."}]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    m = run_harvest(tiny_llama, src, tmp_path / "t", HarvestOptions(hooks=HOOKS[:1], context=16, truncate=True),
                    stream=None)
    assert m["truncated_documents"] == 1 and m["skipped_empty_documents"] == 1 and m["documents"] == 3
    table = read_dir(tmp_path / "t")
    cut = model.lm.text_prompt(long["text"])[:16]
    check_against_engine(model, table, {0: docs[0], 2: cut, 3: docs[3]}, HOOKS[:1], 16)

    m = run_harvest(tiny_llama, src, tmp_path / "b", HarvestOptions(hooks=HOOKS[:1], context=16, truncate=True,
                                                                    max_tokens=20), stream=None)
    assert m["tokens"] == 20 and m["documents_cut_by_max_tokens"] == 1
    budget = read_dir(tmp_path / "b")
    assert budget.to_pylist() == table.slice(0, 20).to_pylist()  # a causal prefix: the same rows

    plain = run_harvest(tiny_llama, write_jsonl(tmp_path / "c.jsonl", corpus(3)), tmp_path / "p",
                        HarvestOptions(hooks=HOOKS[:1], context=64, shard_rows=60), stream=None)
    shuffled = run_harvest(tiny_llama, tmp_path / "c.jsonl", tmp_path / "s",
                           HarvestOptions(hooks=HOOKS[:1], context=64, shard_rows=60, shuffle=7), stream=None)
    assert shuffled["shuffle"] == {"seed": 7, "scope": "rows within each shard"}
    for a, b in zip(plain["shards"], shuffled["shards"]):
        ta, tb = pq.read_table(tmp_path / "p" / a["file"]), pq.read_table(tmp_path / "s" / b["file"])
        assert ta["position"].to_pylist() != tb["position"].to_pylist()  # permuted
        assert sorted_rows(ta).to_pylist() == sorted_rows(tb).to_pylist()  # the same rows, same shard


class Interrupt(Exception):
    pass


def test_resume_after_failure_equals_uninterrupted(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(4))
    options = HarvestOptions(hooks=HOOKS[:2], context=64, shard_rows=50, shuffle=3)
    whole = run_harvest(tiny_llama, src, tmp_path / "whole", options, stream=None)
    assert len(whole["shards"]) >= 5

    out = tmp_path / "out"

    def stop_after_two(entry):
        if entry["file"] == "shard-00001.parquet":
            raise Interrupt

    with pytest.raises(Interrupt):
        run_harvest(tiny_llama, src, out, options, stream=None, after_shard=stop_after_two)
    assert not (out / MANIFEST).exists() and (out / PROGRESS).exists()
    assert pads.dataset(out).count_rows() == sum(s["rows"] for s in whole["shards"][:2])  # only finished shards
    # a crash in the middle of the next shard: its temporary file, and a shard renamed but never listed
    (out / ".tmp-shard-00002.parquet").write_bytes(b"PAR1 half written")
    (out / "shard-00002.parquet").write_bytes(b"PAR1 never listed")
    resumed = run_harvest(tiny_llama, src, out, options, stream=None)
    assert read_dir(out).equals(read_dir(tmp_path / "whole"))  # row for row
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert sorted(f.name for f in out.iterdir()) == sorted([MANIFEST] + [s["file"] for s in whole["shards"]])
    # complete: running again changes nothing; another job in the same directory is refused
    assert run_harvest(tiny_llama, src, out, options, stream=None) == resumed
    with pytest.raises(Exception, match="holds another harvest"):
        run_harvest(tiny_llama, src, out, HarvestOptions(hooks=HOOKS[:1], context=64, shard_rows=50), stream=None)


def _cli(tiny_path, src, out, *extra):
    return ["harvest", str(src), "--out", str(out), "--model", str(tiny_path), "--hook", HOOKS[0], "--hook", HOOKS[1],
            "--context", "64", "--shard-rows", "40", *extra]


def test_bad_input_fails_clearly_and_writes_nothing(tiny_llama_path, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", corpus())
    cases = [
        (_cli(tiny_llama_path, tmp_path / "missing.jsonl", tmp_path / "o1"), "no such file"),
        (_cli(tiny_llama_path, write_jsonl(tmp_path / "long.jsonl", [{"text": "Hi"}, {"text": "The answer. " * 40}]),
              tmp_path / "o2"), "long.jsonl line 2 (document 1) has"),
        (_cli(tiny_llama_path, good, tmp_path / "o3") + ["--hook", "blocks.9.hook_resid_post"], "unknown layer"),
        (_cli(tiny_llama_path, good, tmp_path / "o4") + ["--hook", "blocks.1:nonsense"], "unknown component"),
        (["harvest", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o5"), "--model", str(tiny_llama_path),
          "--hook", HOOKS[0]], "line 2: not valid JSON"),
        (_cli(tiny_llama_path, write_jsonl(tmp_path / "nofield.jsonl", [{"txt": "x"}]), tmp_path / "o6"),
         "needs exactly one of 'text'"),
        (_cli(tiny_llama_path, good, tmp_path / "o7", "--context", "100000"), "context must be between"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    for argv, message in cases:
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code != 0 and message in err and "nsbridge harvest: error:" in err, (argv, err)
        out = Path(argv[argv.index("--out") + 1])
        assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".parquet" or p.name == MANIFEST]
    # a directory holding something else is not written into
    (tmp_path / "o8").mkdir()
    (tmp_path / "o8" / "notes.txt").write_text("mine")
    assert cli_main(_cli(tiny_llama_path, good, tmp_path / "o8")) == 1
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_killed_and_interrupted_resumes_row_for_row(tiny_llama_path, tmp_path):
    """The CLI as a subprocess: Ctrl-C after the first shard (exit 130), kill -9 after the next
    one, then a rerun finishes; the result equals an uninterrupted run row for row."""
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(60))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run_until(out: Path, shard: str, sig) -> subprocess.CompletedProcess | None:
        proc = subprocess.Popen([sys.executable, "-m", "control.cli", *_cli(tiny_llama_path, src, out)], cwd=ROOT,
                                env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (out / shard).exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
        return proc.returncode, err

    out = tmp_path / "out"
    code, err = run_until(out, "shard-00000.parquet", signal.SIGINT)
    assert code == 130 and "run the same command again to resume" in err, err
    # Ctrl-C may land between a shard's rename and its listing: then it is redone on restart.
    n = len(json.loads((out / PROGRESS).read_text())["shards"]) if (out / PROGRESS).exists() else 0
    code, err = run_until(out, f"shard-{n + 1:05d}.parquet", signal.SIGKILL)
    assert code == -signal.SIGKILL and not (out / MANIFEST).exists()
    done = subprocess.run([sys.executable, "-m", "control.cli", *_cli(tiny_llama_path, src, out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stderr and "MB" in done.stderr and "eta" in done.stderr
    whole = tmp_path / "whole"
    assert cli_main(_cli(tiny_llama_path, src, whole)) == 0
    assert read_dir(out).equals(read_dir(whole))
    assert [s["sha256"] for s in json.loads((out / MANIFEST).read_text())["shards"]] == \
        [s["sha256"] for s in json.loads((whole / MANIFEST).read_text())["shards"]]


def test_stopped_before_its_first_shard_was_listed_resumes(tmp_path):
    """Stopped between the first shard's rename and its listing: the directory is still this job's,
    and the unlisted shard is dropped to be redone."""
    from harvest.store import ShardStore

    job = {"model": "m", "hooks": ["blocks.0.hook_resid_post"]}
    ShardStore(tmp_path, job).open()
    (tmp_path / "shard-00000.parquet").write_bytes(b"written, never listed")
    state = ShardStore(tmp_path, job).open()
    assert state.shards == [] and not (tmp_path / "shard-00000.parquet").exists()
    with pytest.raises(Exception, match="another|different|job"):
        ShardStore(tmp_path, {**job, "model": "other"}).open()
