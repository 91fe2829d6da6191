"""The viewer: `GET /viz` (a static page shipped in this package) and the two server-side helpers
it needs so that it never downloads more than it draws.

- `select_columns`: a capture's Arrow stream cut down to some hook columns (and heads), for
  `GET /v1/activations/{id}?hooks=...&heads=...`. Still Arrow, never JSON floats.
- `logit_lens`: `POST /v1/activations/{id}/logit_lens`, the top-k tokens of each captured
  residual read through the final norm and the unembedding (engine/lens.py), computed on the
  model's worker thread, so the page gets k numbers per layer and position, not the vocabulary.

The page and its assets are public (they hold no data; the API key middleware lets them
through like /health); every request the page makes for data goes through the usual Host,
Origin and API-key checks, same-origin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from control.errors import InvalidRequest, NotFound, from_engine
from control.schemas import LogitLensRequest, parse_body
from engine.errors import EngineError
from engine.generate import token_texts
from shm.format import RESERVED_COLUMNS
from shm.reader import read_capture_bytes, read_table
from vocabulary import COMPONENTS

STATIC = Path(__file__).resolve().parent / "viz"
# The only files served under /viz/ (nothing else in the folder, no path from the request).
ASSETS = {
    "viz.js": "text/javascript; charset=utf-8",
    "viz.css": "text/css; charset=utf-8",
    "flechette.mjs": "text/javascript; charset=utf-8",
    "flechette.LICENSE": "text/plain; charset=utf-8",
}
# The page runs only its own scripts and talks only to its own origin.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(request: Request) -> Response:
    """The viewer (HTML)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(request: Request) -> Response:
    """A file of the viewer (script, style sheet, vendored Arrow decoder)."""
    name = request.path_params["name"]
    if name not in ASSETS:
        raise NotFound(f"no viewer file {name!r}; the viewer serves {', '.join(sorted(ASSETS))}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)


# --- a capture cut to the columns on screen ---------------------------------------------------
def _names(text: str, param: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InvalidRequest(f"'{param}' is empty: give comma-separated values", param)
    return names


def parse_heads(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        heads = [int(h) for h in _names(text, "heads")]
    except ValueError:
        raise InvalidRequest(f"'heads' must be comma-separated head indices (got {text!r})", "heads") from None
    if any(h < 0 for h in heads) or len(set(heads)) != len(heads):
        raise InvalidRequest(f"'heads' must be distinct non-negative indices (got {text!r})", "heads")
    return heads


def select_columns(data: memoryview, hooks: list[str] | None, heads: list[int] | None) -> bytes:
    """The capture's Arrow stream with only `step`, `position`, `token_id` and the columns `hooks`
    (None: all); with `heads`, per-head columns keep only those heads (in that order: field
    metadata `nsbridge.shape` is updated and `nsbridge.heads` lists the original indices)."""
    table = read_table(data)
    columns = [f.name for f in table.schema if f.name not in RESERVED_COLUMNS]
    if hooks is not None:
        unknown = [h for h in hooks if h not in columns]
        if unknown:
            raise InvalidRequest(f"the capture has no column {', '.join(map(repr, unknown))}; it has "
                                 f"{', '.join(columns)}", "hooks")
        columns = list(dict.fromkeys(hooks))
    fields, arrays = [], []
    for name in [*RESERVED_COLUMNS, *columns]:
        field, column = table.schema.field(name), table.column(name)
        meta = field.metadata or {}
        component = COMPONENTS.get(meta.get(b"nsbridge.component", b"").decode())
        if heads is not None and component is not None and component.per_head:
            field, column = _pick_heads(field, column, heads)
        fields.append(field)
        arrays.append(column)
    out = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, out.schema) as writer:
        writer.write_table(out)
    return sink.getvalue().to_pybytes()


def _pick_heads(field: pa.Field, column: pa.ChunkedArray, heads: list[int]) -> tuple[pa.Field, pa.Array]:
    shape = json.loads(field.metadata[b"nsbridge.shape"])
    if max(heads) >= shape[0]:
        raise InvalidRequest(f"'heads' {heads} is out of range for column {field.name!r}, which has {shape[0]} "
                             f"heads (0 to {shape[0] - 1})", "heads")
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    values = storage.flatten().to_numpy(zero_copy_only=False).reshape((len(arr), *shape))
    picked = np.ascontiguousarray(values[:, heads])
    new_shape = [len(heads), *shape[1:]]
    ext = field.type
    tensor_type = pa.fixed_shape_tensor(ext.value_type, new_shape, dim_names=ext.dim_names)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(picked.reshape(-1), type=ext.value_type),
                                                int(np.prod(new_shape)))
    meta = {**field.metadata, b"nsbridge.shape": json.dumps(new_shape).encode(),
            b"nsbridge.heads": json.dumps(heads).encode()}
    return (pa.field(field.name, tensor_type, nullable=False, metadata=meta),
            pa.ExtensionArray.from_storage(tensor_type, storage))


async def get_capture_columns(request: Request, data: memoryview) -> bytes:
    """The body of `GET /v1/activations/{id}`: the whole stream, or the columns its query names."""
    hooks, heads = request.query_params.get("hooks"), request.query_params.get("heads")
    if hooks is None and heads is None:
        return bytes(data)
    selected = None if hooks is None else _names(hooks, "hooks")
    return await run_in_threadpool(select_columns, data, selected, parse_heads(heads))


# --- the logit lens ---------------------------------------------------------------------------
def _residuals(data: memoryview, layers: list[int] | None, positions: list[int] | None, model_id: str):
    """The capture's residual-stream outputs as float32 [L, rows, d_model], their layers and positions."""
    with read_capture_bytes(data) as cap:
        if cap.model_id != model_id:
            raise InvalidRequest(f"capture {cap.capture_id!r} was made by model {cap.model_id!r}, but "
                                 f"{model_id!r} is loaded", "capture_id")
        by_layer = {h.info.layer_index: h for h in cap if h.info.component == "residual" and not h.info.is_input
                    and h.info.layer_index is not None}
        if not by_layer:
            raise InvalidRequest("the capture has no residual-stream output (capture blocks.N.hook_resid_post, "
                                 "i.e. component 'residual', for the layers to read)", "capture_id")
        have = sorted(by_layer)
        if layers is None:
            layers = have
        missing = [n for n in layers if n not in by_layer]
        if missing:
            raise InvalidRequest(f"the capture has no residual for layer(s) {missing}; it has layers {have}",
                                 "layers")
        row_pos = cap.position
        if positions is None:
            rows = np.arange(len(row_pos))
        else:
            index = {int(p): i for i, p in enumerate(row_pos)}
            absent = [p for p in positions if p not in index]
            if absent:
                raise InvalidRequest(f"the capture has no position(s) {absent}; it has 0 to {len(row_pos) - 1}",
                                     "positions")
            rows = np.array([index[p] for p in positions], dtype=np.int64)
        stacked = np.stack([by_layer[n].to_float32()[rows] for n in layers])  # a copy: safe after release
        return stacked, layers, [int(p) for p in row_pos[rows]]


async def logit_lens(request: Request) -> Response:
    """Logit lens of a capture's residual stream: top-k tokens per layer and position."""
    server = request.app.state.server
    capture_id = request.path_params["capture_id"]
    data = server.delivery.read(capture_id)  # an unknown capture is a 404 whatever the body says
    body = parse_body(await request.body(), LogitLensRequest)
    model = server.service.require_model()
    residuals, layers, positions = await run_in_threadpool(_residuals, data, body.layers, body.positions,
                                                           model.info.model_id)
    del data
    try:
        ids, probs = await server.service.run(model.logit_lens, residuals, body.top_k)
    except EngineError as exc:
        raise from_engine(exc) from exc
    unique = sorted({int(i) for i in np.unique(ids)})
    texts = await run_in_threadpool(token_texts, model.lm.tokenizer, unique)
    return JSONResponse({
        "object": "logit_lens", "capture_id": capture_id, "model": model.info.model_id, "top_k": int(ids.shape[-1]),
        "layers": layers, "positions": positions, "token_ids": ids.tolist(),
        "probs": probs.tolist(),
        "strings": {str(i): t for i, t in zip(unique, texts)},
    })
