"""Documents from a JSONL or Parquet file, each with its 0-based index (the `doc_id`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


class InputError(Exception):
    """The input cannot be read, or a record is not a document."""


def input_format(path: Path) -> str:
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise InputError(f"{path}: unknown input format {suffix or '(no suffix)'!r}; use .jsonl or .parquet")


def check_readable(path: Path) -> str:
    """The input's format, after checking it can be opened (errors before any model work)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    fmt = input_format(path)
    try:
        with open(path, "rb") as f:
            f.read(1)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.ParquetFile(path)
    except Exception as exc:  # OSError, pyarrow's ArrowInvalid
        raise InputError(f"{path}: cannot read it: {exc}") from None
    return fmt


def read_documents(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(doc_id, where, record) for each document, in file order. JSONL: one JSON object a line,
    blank lines skipped (doc_id counts records, not lines); `where` names the line."""
    path = Path(path)
    fmt = check_readable(path)
    if fmt == "jsonl":
        doc_id = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}, line {lineno}: not valid JSON: {exc}") from None
                yield doc_id, f"{path.name} line {lineno} (document {doc_id})", record
                doc_id += 1
        return
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in ("text", "messages") if c in names]
    if not columns:
        raise InputError(f"{path}: no 'text' or 'messages' column (columns: {', '.join(sorted(names))})")
    doc_id = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            record = {k: v for k, v in record.items() if v is not None}
            yield doc_id, f"{path.name} row {doc_id} (document {doc_id})", record
            doc_id += 1
