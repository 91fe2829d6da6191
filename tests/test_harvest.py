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


def assert_same(got: np.ndarray, want: np.ndarray, dtype: str, exact: bool) -> bool:
    """Equal, or (a document that shared its forward) equal to float rounding: |got - want| <=
    1e-5 + 1e-4 |want| in float32 (float16: 1e-3 + 2e-3 |want|, its own rounding of those); -inf
    exactly where the mask puts it."""
    if exact:
        assert np.array_equal(got, want)
        return True
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    rtol, atol = (1e-4, 1e-5) if dtype == "float32" else (2e-3, 1e-3)
    np.testing.assert_allclose(got[finite].astype(np.float32), want[finite].astype(np.float32), rtol=rtol, atol=atol)
    return True


def check_against_engine(model, table: pa.Table, docs: dict[int, dict | list[int]], hooks: list[str], context: int,
                         dtype: str = "float32", exact: bool = False) -> None:
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
                assert_same(got[..., :n], want[..., :n], dtype, exact), h
                assert not got[..., n:].any(), h  # keys never seen: probability 0
            else:
                assert_same(got, want, dtype, exact), (h, doc_id)


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
    """pandas and pyarrow.dataset open the directory at their defaults; DuckDB, Polars and Hugging
    Face datasets open its shards by glob (they do not skip `_manifest.json` in a directory)."""
    duckdb = pytest.importorskip("duckdb", reason="the test extra installs duckdb")
    pl = pytest.importorskip("polars", reason="the test extra installs polars")
    datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")
    pd = pytest.importorskip("pandas", reason="the test extra installs pandas")
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(2))
    out = tmp_path / "out"
    manifest = run_harvest(tiny_llama, src, out, HarvestOptions(hooks=HOOKS[:2], context=64, shard_rows=50),
                           stream=None)
    names = ["doc_id", "position", "token_id", *HOOKS[:2]]
    want = read_dir(out)
    dataset = pads.dataset(out)
    assert dataset.count_rows() == manifest["tokens"] and dataset.schema.names == names
    assert sorted_rows(dataset.to_table()).equals(sorted_rows(want))
    df = pd.read_parquet(out)
    assert len(df) == manifest["tokens"] and list(df.columns) == names
    assert len(df["blocks.1.hook_resid_post"].iloc[0]) == 64
    glob = str(out / "*.parquet")
    con = duckdb.connect()
    assert con.execute(f"select count(*), count(distinct doc_id), sum(position) from '{glob}'").fetchone() == \
        (manifest["tokens"], manifest["documents"], pc.sum(want["position"]).as_py())
    first = con.execute(f"select \"{HOOKS[0]}\" from '{glob}' where doc_id = 0 and position = 0").fetchone()[0]
    assert np.array_equal(np.asarray(first, np.float32), want[HOOKS[0]][0].values.to_numpy())
    frame = pl.read_parquet(glob)
    assert frame.columns == names and frame.height == manifest["tokens"]
    assert np.array_equal(frame[HOOKS[1]].to_numpy()[:3].astype(np.float32),
                          pc.list_flatten(want[HOOKS[1]].slice(0, 3)).to_numpy().reshape(3, -1))
    hf = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == manifest["tokens"] and hf.column_names == names
    assert hf.features[HOOKS[0]].length == 64
    assert np.array_equal(np.asarray(hf.with_format("numpy")[:5][HOOKS[0]], np.float32),
                          pc.list_flatten(want[HOOKS[0]].slice(0, 5)).to_numpy().reshape(5, -1))

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
    assert shuffled["shuffle"] == {"seed": 7, "scope": "rows permuted across all shards"}
    assert shuffled["tokens"] == plain["tokens"] and shuffled["documents"] == plain["documents"]
    assert [s["rows"] for s in shuffled["shards"]] == [60] * (plain["tokens"] // 60) + \
        ([plain["tokens"] % 60] if plain["tokens"] % 60 else [])  # full shards: rows are no longer whole documents
    assert sorted(f.name for f in (tmp_path / "s").iterdir()) == \
        sorted([MANIFEST] + [s["file"] for s in shuffled["shards"]])  # the staged shards are gone
    rows = read_dir(tmp_path / "s")
    first = pq.read_table(tmp_path / "s" / shuffled["shards"][0]["file"])
    assert len(set(first["doc_id"].to_pylist())) > len(plain["shards"][0]["file"]) // 4  # mixed across documents
    assert set(first["doc_id"].to_pylist()) - set(pq.read_table(tmp_path / "p" / plain["shards"][0]["file"])
                                                  ["doc_id"].to_pylist())  # rows from later shards
    assert sorted_rows(rows).to_pylist() == sorted_rows(read_dir(tmp_path / "p")).to_pylist()  # the same rows
    again = run_harvest(tiny_llama, tmp_path / "c.jsonl", tmp_path / "s2",
                        HarvestOptions(hooks=HOOKS[:1], context=64, shard_rows=60, shuffle=7), stream=None)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in shuffled["shards"]]  # seeded


def test_batched_forwards_equal_one_document_at_a_time(model, tiny_llama, tmp_path):
    """Documents of different lengths, right-padded into shared forwards, give the values each
    gives alone (float32: |batched - alone| <= 1e-5 + 1e-4 |alone|; the pads on the key axis exactly)."""
    docs = corpus(2) + [{"text": "Hi"}, {"text": "The capital of France is Paris. " * 3},
                        {"text": "The capital of France is Paris. " * 3 + "Yes."}]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    hooks = HOOKS + ["model.layers.1:attention_scores", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_v"]
    forwards = []
    from engine import harvest as engine_harvest

    def counting(fn, *args):
        forwards.append([len(ids) for ids in args[1]])
        return fn(*args)

    batched = run_harvest(tiny_llama, src, tmp_path / "b", HarvestOptions(hooks=hooks, context=64, batch_size=4),
                          stream=None, call=lambda fn, *a: counting(fn, *a) if fn is engine_harvest.capture_batch
                          else fn(*a))
    assert batched["batch_size"] == 4 and max(map(len, forwards)) == 4
    assert any(len(set(f)) > 1 for f in forwards)  # some forward mixes lengths: padding happened
    alone = run_harvest(tiny_llama, src, tmp_path / "a", HarvestOptions(hooks=hooks, context=64, batch_size=1),
                        stream=None)
    a, b = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert alone["tokens"] == batched["tokens"] == a.num_rows
    assert a.select(["doc_id", "position", "token_id"]).equals(b.select(["doc_id", "position", "token_id"]))
    for h in hooks:
        x = a[h].combine_chunks().flatten().to_numpy()
        y = b[h].combine_chunks().flatten().to_numpy()
        assert np.array_equal(np.isneginf(x), np.isneginf(y)), h  # masked and padded keys: -inf in both
        finite = np.isfinite(x)
        np.testing.assert_allclose(y[finite], x[finite], rtol=1e-4, atol=1e-5, err_msg=h)
    # and one document alone in its forward is exactly the engine's capture
    check_against_engine(model, a, {0: docs[0], len(docs) - 1: docs[-1]}, HOOKS, 64, exact=True)


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


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 192 KiB tmpfs (we may run as root in CI); skipped where mounting is not permitted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_full_disk_fails_clearly_keeps_whole_shards_and_resumes(tiny_llama_path, tiny_llama, small_tmpfs, tmp_path,
                                                               capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(12))
    whole = tmp_path / "whole"
    assert cli_main(_cli(tiny_llama_path, src, whole)) == 0
    capsys.readouterr()
    total = sum(s["bytes"] for s in json.loads((whole / MANIFEST).read_text())["shards"])
    assert total > 192 * 1024, "the job must not fit in the tmpfs"
    out = small_tmpfs / "out"
    code = cli_main(_cli(tiny_llama_path, src, out))
    err = capsys.readouterr().err
    assert code == 1 and "nsbridge harvest: error:" in err and "No space left on device" in err, err
    listed = json.loads((out / PROGRESS).read_text())["shards"]
    assert listed, "some shards fit before the disk filled"
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], names  # no half-written file left
    assert not (out / MANIFEST).exists()
    for p in out.glob("*.parquet"):  # every shard a reader sees is whole
        pq.read_table(p)
    assert pads.dataset(out).count_rows() >= sum(s["rows"] for s in listed)
    # room again (the tmpfs grown in place): the rerun finishes and equals the uninterrupted run
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True, timeout=30)
    assert cli_main(_cli(tiny_llama_path, src, out)) == 0
    assert read_dir(out).equals(read_dir(whole))


def test_shuffled_job_resumes_from_staging_and_from_the_final_pass(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(3))
    options = HarvestOptions(hooks=HOOKS[:2], context=64, shard_rows=60, shuffle=11)
    whole = run_harvest(tiny_llama, src, tmp_path / "whole", options, stream=None)
    for stop_at in ("_stage-00001.arrow", "shard-00001.parquet"):  # while staging; while writing shuffled shards
        out = tmp_path / stop_at

        def stop(entry):
            if entry["file"] == stop_at:
                raise Interrupt

        with pytest.raises(Interrupt):
            run_harvest(tiny_llama, src, out, options, stream=None, after_shard=stop)
        assert not (out / MANIFEST).exists()
        assert pads.dataset(out).count_rows() <= whole["tokens"]  # staged files are hidden from readers
        resumed = run_harvest(tiny_llama, src, out, options, stream=None)
        assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]], stop_at
        assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [s["file"] for s in whole["shards"]])
