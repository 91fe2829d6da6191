// The nsbridge viewer (GET /viz). One run = one streamed /with_activations request whose capture
// stays on the server (activations_transport "shm"); the page then fetches, as Arrow, only the
// columns it draws (GET /v1/activations/{id}?hooks=...), and asks the server for the logit lens's
// top-k (POST /v1/activations/{id}/logit_lens). Heatmaps are canvases filled through ImageData.
import { tableFromIPC } from "/viz/flechette.mjs";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "nsbridge.apiKey";

const S = {
  key: sessionStorage.getItem(KEY_STORE),
  model: null,         // {id, n_layers, n_heads, d_mlp}
  run: null,           // the last run: request, capture id, tokens, captured kinds
  columns: new Map(),  // column name -> {shape, values, positions, rows}
  fetching: new Map(), // column name -> promise
  queue: new Set(),    // layers waiting for their attention patterns
  selected: null,      // {layer, head}
  lens: null,
  pendingView: null,   // a shared link's view, applied once its run is done
};
window.nsviz = S; // for the console (and the tests)

// --- HTTP ---------------------------------------------------------------------------------
async function api(path, { body, method } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (S.key) headers["Authorization"] = "Bearer " + S.key;
  const res = await fetch(path, {
    method: method || (body !== undefined ? "POST" : "GET"), headers,
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  if (res.status === 401) {
    askKey();
    throw new Error("this server needs an API key: enter it above");
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error.message || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}

function askKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fail(err) {
  status(String(err && err.message ? err.message : err), true);
}

// --- the model ----------------------------------------------------------------------------
async function loadModel() {
  const res = await api("/v1/models");
  const card = (await res.json()).data[0];
  if (!card) throw new Error("no model is loaded: POST /v1/models/load first");
  S.model = { id: card.id, n_layers: card.n_layers, n_heads: card.n_heads, d_mlp: card.d_mlp };
  $("model").textContent = `${card.id} · ${card.n_layers} layers · ${card.n_heads} heads`;
  await loadVectors();
}

async function loadVectors(selectId) {
  const res = await api("/v1/vectors");
  const sel = $("steer-vector");
  sel.replaceChildren();
  for (const v of (await res.json()).data) {
    const opt = new Option(`${v.name || v.vector_id} [${v.shape}]`, v.vector_id);
    sel.add(opt);
  }
  if (selectId) sel.value = selectId;
}

// --- the request, and the link that reloads it ------------------------------------------
function request() {
  return {
    mode: document.querySelector("input[name=mode]:checked").value,
    prompt: $("prompt").value,
    max_tokens: Number($("max-tokens").value) || 1,
    temperature: Number($("temperature").value) || 0,
    capture: { pattern: $("cap-pattern").checked, resid: $("cap-resid").checked, mlp: $("cap-mlp").checked },
  };
}

function setRequest(r) {
  for (const el of document.querySelectorAll("input[name=mode]")) el.checked = el.value === r.mode;
  $("prompt").value = r.prompt;
  $("max-tokens").value = r.max_tokens;
  $("temperature").value = r.temperature;
  $("cap-pattern").checked = !!r.capture.pattern;
  $("cap-resid").checked = !!r.capture.resid;
  $("cap-mlp").checked = !!r.capture.mlp;
}

function view() {
  return {
    selected: S.selected,
    colour: {
      mode: $("colour-mode").value, layer: Number($("colour-layer").value), neuron: Number($("colour-neuron").value),
      head: Number($("colour-head").value), source: Number($("colour-source").value),
    },
  };
}

function setView(v) {
  if (v.colour) {
    $("colour-mode").value = v.colour.mode;
    for (const k of ["layer", "neuron", "head", "source"]) $("colour-" + k).value = v.colour[k];
    document.body.className = "colour-" + v.colour.mode;
  }
  if (v.selected) selectHead(v.selected.layer, v.selected.head);
  colourTokens();
}

const b64url = {
  encode: (obj) => {
    let bin = "";
    for (const byte of new TextEncoder().encode(JSON.stringify(obj))) bin += String.fromCharCode(byte);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  },
  decode: (text) => JSON.parse(new TextDecoder().decode(
    Uint8Array.from(atob(text.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0)))),
};

function shareLink() {
  const state = { r: S.run ? S.run.request : request(), v: view() };
  const url = new URL(location.href);
  url.hash = "v=" + b64url.encode(state);
  history.replaceState(null, "", url);
  $("share-url").value = url.href;
  return url.href;
}

function linkedState() {
  const m = location.hash.match(/^#v=([A-Za-z0-9_-]+)$/);
  if (!m) return null;
  try { return b64url.decode(m[1]); } catch (e) { return null; }
}

// --- a run: stream the tokens, keep the capture on the server -----------------------------
function hookSpecs(r) {
  const hooks = [];
  for (let l = 0; l < S.model.n_layers; l++) {
    if (r.capture.pattern) hooks.push({ layer_name: `blocks.${l}.attn.hook_pattern`, hook_id: `L${l}.pattern` });
    if (r.capture.resid) hooks.push({ layer_name: `blocks.${l}.hook_resid_post`, hook_id: `L${l}.resid` });
    if (r.capture.mlp) hooks.push({ layer_name: `blocks.${l}.mlp.hook_post`, hook_id: `L${l}.mlp` });
  }
  return hooks;
}

function promptFields(r) {
  return r.mode === "chat" ? { messages: [{ role: "user", content: r.prompt }] } : { prompt: r.prompt };
}

async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function run() {
  const r = request();
  if (!r.capture.pattern && !r.capture.resid && !r.capture.mlp) throw new Error("capture at least one kind");
  const old = S.run;
  S.run = null;
  S.columns.clear();
  S.fetching.clear();
  S.lens = null;
  S.selected = null;
  delete document.body.dataset.run;
  for (const c of [$("lens-canvas"), $("detail-canvas")]) {
    c.width = c.height = 0;
    c.style.width = c.style.height = "";
    for (const k of Object.keys(c.dataset)) delete c.dataset[k];
  }
  $("detail-title").textContent = "click a head";
  $("detail-hover").textContent = $("lens-hover").textContent = "";
  if (old && old.captureId) api(`/v1/activations/${old.captureId}/release`, { body: {} }).catch(() => {});
  $("run").disabled = true;
  try {
    status("running…");
    const body = {
      ...promptFields(r), max_tokens: r.max_tokens, temperature: r.temperature, stream: true,
      stream_options: { include_usage: true }, activation_hooks: hookSpecs(r),
      activations_transport: "shm", activation_dtype: "float32",
    };
    const res = await api("/v1/chat/completions/with_activations", { body });
    const tokens = $("tokens");
    tokens.replaceChildren(document.createTextNode(r.mode === "chat" ? "" : r.prompt));
    const streamed = document.createElement("span");
    streamed.className = "tok gen";
    tokens.append(streamed);
    let final = null, usage = null, n = 0;
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        streamed.textContent += delta.content;
        status(`generating: ${++n} tokens`);
        streamed.dataset.tokens = String(n); // for scripts watching the stream grow
      }
      if (chunk.capture) final = chunk;
      if (chunk.usage) usage = chunk.usage;
    }
    if (!final) throw new Error("the stream ended without a capture");
    S.run = {
      request: r, captureId: final.capture.capture_id, tokens: final.tokens, tokenIds: final.token_ids,
      promptTokens: usage ? usage.prompt_tokens : final.tokens.length, kinds: r.capture,
      text: streamed.textContent,
    };
    status(`${final.tokens.length} tokens; capture ${S.run.captureId}`);
    renderTokens();
    buildGrid();
    shareLink();
    if (S.pendingView) {
      setView(S.pendingView);
      S.pendingView = null;
    }
    document.body.dataset.ready = "1";
    document.body.dataset.run = S.run.captureId; // for scripts waiting on a run (the page's CSP forbids eval)
  } finally {
    $("run").disabled = false;
  }
  if (S.run.kinds.resid) runLens(S.run).catch(fail); // in the background, a few layers at a time
}

// --- Arrow columns, fetched only when drawn ------------------------------------------------
async function columns(names) {
  const need = names.filter((n) => !S.columns.has(n) && !S.fetching.has(n));
  if (need.length) {
    const captureId = S.run.captureId;
    const job = (async () => {
      const res = await api(`/v1/activations/${captureId}?hooks=${encodeURIComponent(need.join(","))}`);
      const table = tableFromIPC(new Uint8Array(await res.arrayBuffer()));
      if (!S.run || S.run.captureId !== captureId) return;
      const positions = table.getChild("position").toArray();
      for (const name of need) {
        const field = table.schema.fields.find((f) => f.name === name);
        const shape = JSON.parse(field.metadata.get("nsbridge.shape"));
        S.columns.set(name, { shape, positions, rows: table.numRows, values: floats(table.getChild(name)) });
      }
    })();
    for (const name of need) S.fetching.set(name, job);
  }
  await Promise.all(names.map((n) => S.fetching.get(n)));
  return names.map((n) => S.columns.get(n));
}

function floats(column) {
  // A fixed_shape_tensor column: its storage is a fixed-size list; the child holds every value, row-major.
  const parts = column.data.map((batch) => batch.children[0].values.subarray(0, batch.length * batch.stride));
  if (parts.length === 1) return parts[0];
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

// --- tokens -------------------------------------------------------------------------------
function shown(text) {
  return text.replace(/\n/g, "↵\n").replace(/ /g, "\u00b7") || "∅";
}

function renderTokens() {
  const box = $("tokens");
  box.replaceChildren();
  S.run.tokens.forEach((text, pos) => {
    const span = document.createElement("span");
    span.className = "tok" + (pos >= S.run.promptTokens ? " gen" : "");
    span.dataset.pos = pos;
    span.textContent = text;
    span.title = `position ${pos}, token id ${S.run.tokenIds[pos]}`;
    box.append(span);
  });
  colourTokens();
}

function tokenInfo(pos) {
  const span = $("tokens").children[pos];
  const value = span && span.dataset.value !== undefined ? `  value ${span.dataset.value}` : "";
  $("token-info").textContent = `position ${pos}  id ${S.run.tokenIds[pos]}  ${JSON.stringify(S.run.tokens[pos])}${value}`;
}

let colourSeq = 0;

async function colourTokens() {
  if (!S.run) return;
  const seq = ++colourSeq; // inputs change while columns load: only the latest call paints
  const mode = $("colour-mode").value;
  document.body.className = "colour-" + mode;
  const spans = [...$("tokens").children];
  const source = Number($("colour-source").value);
  spans.forEach((s) => s.classList.toggle("source", mode === "attn" && Number(s.dataset.pos) === source));
  const layer = Number($("colour-layer").value);
  let values = null, scale = null, label = "";
  try {
    if (mode === "resid") {
      if (!S.run.kinds.resid) throw new Error("this run did not capture the residual stream");
      const [col] = await columns([`L${layer}.resid`]);
      const d = col.shape[0];
      values = rowValues(col, (row) => {
        let sum = 0;
        for (let i = row * d; i < (row + 1) * d; i++) sum += col.values[i] * col.values[i];
        return Math.sqrt(sum);
      });
      scale = sequential(values, [255, 140, 0]);
      label = `‖residual‖ after layer ${layer}`;
    } else if (mode === "neuron") {
      if (!S.run.kinds.mlp) throw new Error("this run did not capture MLP neurons");
      const [col] = await columns([`L${layer}.mlp`]);
      const d = col.shape[0], n = Number($("colour-neuron").value);
      if (n >= d) throw new Error(`neuron ${n} is out of range (0 to ${d - 1})`);
      values = rowValues(col, (row) => col.values[row * d + n]);
      scale = diverging(values);
      label = `layer ${layer} neuron ${n}`;
    } else if (mode === "attn") {
      if (!S.run.kinds.pattern) throw new Error("this run did not capture attention patterns");
      const [col] = await columns([`L${layer}.pattern`]);
      const [H, K] = col.shape, h = Number($("colour-head").value);
      if (h >= H) throw new Error(`head ${h} is out of range (0 to ${H - 1})`);
      values = rowValues(col, (row) => (source < K ? col.values[(row * H + h) * K + source] : 0));
      scale = (v) => mix([255, 255, 255], [42, 91, 215], v);
      label = `attention of L${layer}H${h} to position ${source}`;
    }
  } catch (err) {
    if (seq !== colourSeq) return;
    fail(err);
    values = null;
  }
  if (seq !== colourSeq) return;
  $("colour-legend").textContent = label;
  spans.forEach((s) => {
    const v = values ? values.get(Number(s.dataset.pos)) : undefined;
    if (v === undefined) {
      s.style.background = "";
      delete s.dataset.value;
    } else {
      s.style.background = scale(v);
      s.dataset.value = String(v);
      s.title = `position ${s.dataset.pos}, token id ${S.run.tokenIds[s.dataset.pos]}: ${v.toPrecision(5)}`;
    }
  });
}

function rowValues(col, fn) {
  const out = new Map();
  for (let row = 0; row < col.rows; row++) out.set(col.positions[row], fn(row));
  return out;
}

function mix(a, b, t) {
  t = Math.max(0, Math.min(1, t));
  return `rgb(${a.map((x, i) => Math.round(x + (b[i] - x) * t)).join(",")})`;
}

function sequential(values, rgb) {
  const max = Math.max(...values.values(), 1e-12);
  return (v) => mix([255, 255, 255], rgb, v / max);
}

function diverging(values) {
  const max = Math.max(...[...values.values()].map(Math.abs), 1e-12);
  return (v) => (v >= 0 ? mix([255, 255, 255], [215, 60, 40], v / max) : mix([255, 255, 255], [40, 90, 215], -v / max));
}

// --- attention: the grid of heads, and one head in full ------------------------------------
let observer = null;

function buildGrid() {
  const grid = $("grid");
  grid.replaceChildren();
  if (observer) observer.disconnect();
  if (!S.run.kinds.pattern) {
    grid.textContent = "attention patterns were not captured";
    return;
  }
  const T = S.run.tokens.length;
  observer = new IntersectionObserver((entries) => {
    for (const e of entries) if (e.isIntersecting) queueLayer(Number(e.target.dataset.layer));
  }, { root: grid, rootMargin: "100px" });
  for (let l = 0; l < S.model.n_layers; l++) {
    const row = document.createElement("div");
    row.className = "layer-row";
    row.dataset.layer = l;
    const label = document.createElement("span");
    label.textContent = "L" + l;
    row.append(label);
    for (let h = 0; h < S.model.n_heads; h++) {
      const c = document.createElement("canvas");
      c.className = "head";
      c.width = T;
      c.height = T;
      c.dataset.layer = l;
      c.dataset.head = h;
      c.title = `layer ${l} head ${h}`;
      c.addEventListener("click", () => selectHead(l, h).catch(fail));
      row.append(c);
    }
    grid.append(row);
    observer.observe(row);
  }
}

function queueLayer(layer) {
  S.queue.add(layer);
  clearTimeout(queueLayer.timer);
  queueLayer.timer = setTimeout(() => {
    const layers = [...S.queue].filter((l) => !S.columns.has(`L${l}.pattern`));
    S.queue.clear();
    if (layers.length) {
      columns(layers.map((l) => `L${l}.pattern`)).then(() => layers.forEach(drawLayer)).catch(fail);
    }
  }, 30);
}

function attentionRGB(v) {
  // white -> deep blue; sqrt lifts the small weights that carry most of a diffuse head
  const t = Math.sqrt(Math.max(0, Math.min(1, v)));
  return [255 - 225 * t, 255 - 190 * t, 255 - 90 * t];
}

function drawLayer(layer) {
  const col = S.columns.get(`L${layer}.pattern`);
  if (!col) return;
  const [H, K] = col.shape, rows = col.rows;
  const canvases = $("grid").querySelectorAll(`canvas.head[data-layer="${layer}"]`);
  canvases.forEach((c) => {
    const h = Number(c.dataset.head);
    c.width = K;
    c.height = rows;
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(K, rows);
    for (let i = 0; i < rows; i++) {
      const base = (i * H + h) * K;
      for (let j = 0; j < K; j++) {
        const [r, g, b] = attentionRGB(col.values[base + j]);
        const p = (i * K + j) * 4;
        img.data[p] = r; img.data[p + 1] = g; img.data[p + 2] = b; img.data[p + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    c.dataset.drawn = "1";
  });
}

async function selectHead(layer, head) {
  S.selected = { layer, head };
  for (const c of $("grid").querySelectorAll("canvas.head.selected")) c.classList.remove("selected");
  const thumb = $("grid").querySelector(`canvas.head[data-layer="${layer}"][data-head="${head}"]`);
  if (thumb) thumb.classList.add("selected");
  const [col] = await columns([`L${layer}.pattern`]);
  drawLayer(layer);
  drawDetail(col, layer, head);
  if (S.run) shareLink();
}

function drawDetail(col, layer, head) {
  const [H, K] = col.shape, rows = col.rows;
  const cell = Math.max(2, Math.min(24, Math.floor(640 / Math.max(rows, K))));
  const labels = cell >= 10;
  const gutter = labels ? 96 : 0;
  const c = $("detail-canvas");
  c.width = gutter + K * cell;
  c.height = gutter + rows * cell;
  c.style.width = c.width + "px";
  c.style.height = c.height + "px";
  Object.assign(c.dataset, { layer, head, cell, ox: gutter, oy: gutter, rows, keys: K });
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, c.width, c.height);
  const img = ctx.createImageData(K * cell, rows * cell);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < K; j++) {
      const [r, g, b] = attentionRGB(col.values[(i * H + head) * K + j]);
      for (let y = 0; y < cell; y++) {
        let p = ((i * cell + y) * K * cell + j * cell) * 4;
        for (let x = 0; x < cell; x++, p += 4) {
          img.data[p] = r; img.data[p + 1] = g; img.data[p + 2] = b; img.data[p + 3] = 255;
        }
      }
    }
  }
  ctx.putImageData(img, gutter, gutter);
  if (labels) {
    ctx.fillStyle = "#333";
    ctx.font = `${Math.min(12, cell - 1)}px ui-monospace, monospace`;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i < rows; i++) ctx.fillText(clip(tokenAt(col.positions[i])), gutter - 3, gutter + (i + 0.5) * cell);
    ctx.save();
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    for (let j = 0; j < K; j++) ctx.fillText(clip(tokenAt(j)), -gutter + 3, gutter + (j + 0.5) * cell);
    ctx.restore();
  }
  $("detail-title").textContent = `layer ${layer} head ${head}: destination (rows) × source (columns)`;
  $("detail-hover").textContent = "hover a cell";
}

function tokenAt(pos) {
  return S.run && pos < S.run.tokens.length ? S.run.tokens[pos] : "";
}

function clip(text) {
  const t = shown(text);
  return t.length > 12 ? t.slice(0, 11) + "…" : t;
}

function detailHover(ev) {
  const c = $("detail-canvas");
  if (!S.selected || !c.dataset.cell) return;
  const col = S.columns.get(`L${S.selected.layer}.pattern`);
  if (!col) return;
  const cell = Number(c.dataset.cell), [H, K] = col.shape;
  const i = Math.floor((ev.offsetY - Number(c.dataset.oy)) / cell);
  const j = Math.floor((ev.offsetX - Number(c.dataset.ox)) / cell);
  const out = $("detail-hover");
  if (i < 0 || j < 0 || i >= col.rows || j >= K) return;
  const v = col.values[(i * H + S.selected.head) * K + j];
  const dst = col.positions[i];
  Object.assign(out.dataset, { row: i, key: j, value: String(v) });
  out.textContent = `L${S.selected.layer}H${S.selected.head}  destination ${dst} ${JSON.stringify(tokenAt(dst))}` +
    `  ← source ${j} ${JSON.stringify(tokenAt(j))}:  ${v.toPrecision(6)}`;
}

// --- logit lens (computed by the server) ---------------------------------------------------
const LENS = { w: 64, h: 18, left: 40, top: 18 };

const LENS_LAYERS_PER_REQUEST = 4; // each request is one short job on the model's thread

async function runLens(run) {
  delete document.body.dataset.lens;
  $("lens-progress").textContent = "computing…";
  const lens = { layers: [], positions: [], token_ids: [], probs: [], strings: {} };
  for (let first = 0; first < S.model.n_layers; first += LENS_LAYERS_PER_REQUEST) {
    const layers = [];
    for (let l = first; l < Math.min(S.model.n_layers, first + LENS_LAYERS_PER_REQUEST); l++) layers.push(l);
    const res = await api(`/v1/activations/${run.captureId}/logit_lens`, { body: { top_k: 5, layers } });
    const part = await res.json();
    if (S.run !== run) return; // a newer run took over
    lens.layers.push(...part.layers);
    lens.positions = part.positions;
    lens.token_ids.push(...part.token_ids);
    lens.probs.push(...part.probs);
    Object.assign(lens.strings, part.strings);
    S.lens = lens;
    drawLens();
    $("lens-progress").textContent = lens.layers.length < S.model.n_layers
      ? `computing: ${lens.layers.length} of ${S.model.n_layers} layers` : "";
  }
  document.body.dataset.lens = run.captureId;
}

function drawLens() {
  const lens = S.lens, c = $("lens-canvas");
  const nL = lens.layers.length, nP = lens.positions.length;
  c.width = LENS.left + nP * LENS.w;
  c.height = LENS.top + nL * LENS.h;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, c.width, c.height);
  // cell colour: the top token's probability, through ImageData (one pixel per cell, scaled up)
  const img = ctx.createImageData(nP, nL);
  for (let l = 0; l < nL; l++) {
    for (let p = 0; p < nP; p++) {
      const t = lens.probs[l][p][0], q = (l * nP + p) * 4;
      img.data[q] = 255 - 200 * t; img.data[q + 1] = 255 - 80 * t; img.data[q + 2] = 255 - 200 * t; img.data[q + 3] = 255;
    }
  }
  const tmp = document.createElement("canvas");
  tmp.width = nP;
  tmp.height = nL;
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, LENS.left, LENS.top, nP * LENS.w, nL * LENS.h);
  ctx.font = "11px ui-monospace, monospace";
  ctx.textBaseline = "middle";
  ctx.fillStyle = "#222";
  for (let l = 0; l < nL; l++) {
    ctx.textAlign = "right";
    ctx.fillText("L" + lens.layers[l], LENS.left - 4, LENS.top + (l + 0.5) * LENS.h);
    ctx.textAlign = "left";
    for (let p = 0; p < nP; p++) {
      ctx.fillText(clip(lens.strings[lens.token_ids[l][p][0]]).slice(0, 8), LENS.left + p * LENS.w + 3,
                   LENS.top + (l + 0.5) * LENS.h);
    }
  }
  ctx.fillStyle = "#667";
  for (let p = 0; p < nP; p++) ctx.fillText(clip(tokenAt(lens.positions[p])).slice(0, 8), LENS.left + p * LENS.w + 3, LENS.top / 2);
  Object.assign(c.dataset, { w: LENS.w, h: LENS.h, left: LENS.left, top: LENS.top });
}

function lensHover(ev) {
  const lens = S.lens;
  if (!lens) return;
  const l = Math.floor((ev.offsetY - LENS.top) / LENS.h), p = Math.floor((ev.offsetX - LENS.left) / LENS.w);
  if (l < 0 || p < 0 || l >= lens.layers.length || p >= lens.positions.length) return;
  const pos = lens.positions[p];
  const top = lens.token_ids[l][p].map((id, k) => `${JSON.stringify(lens.strings[id])} ${lens.probs[l][p][k].toFixed(4)}`);
  const out = $("lens-hover");
  Object.assign(out.dataset, { layer: lens.layers[l], position: pos, ids: lens.token_ids[l][p].join(",") });
  out.textContent = `layer ${lens.layers[l]}, position ${pos} ${JSON.stringify(tokenAt(pos))} → ${top.join("  ")}`;
}

// --- steering, side by side -----------------------------------------------------------------
function intervention() {
  const op = $("steer-op").value;
  const spec = { layer_name: $("steer-site").value.trim(), op };
  const coef = Number($("steer-coef").value);
  if (op === "scale") spec.coefficient = coef;
  if (op === "add") {
    if (!$("steer-vector").value) throw new Error("no stored vector: make one from the capture first");
    spec.vector_id = $("steer-vector").value;
    spec.coefficient = coef;
  }
  const heads = $("steer-heads").value.trim();
  if (heads) spec.heads = heads.split(",").map((h) => Number(h.trim()));
  return spec;
}

async function steer() {
  const r = S.run ? S.run.request : request();
  const body = {
    ...promptFields(r), max_tokens: r.max_tokens, temperature: r.temperature,
    interventions: [intervention()], baseline: true, logprobs: true,
  };
  for (const box of [$("steered"), $("baseline")]) {
    box.replaceChildren();
    delete box.dataset.text;
  }
  status("steering…");
  const res = await api("/v1/chat/completions", { body });
  const out = await res.json();
  showCompletion($("steered"), out.choices[0]);
  showCompletion($("baseline"), out.baseline.choices[0]);
  status("steered and baseline");
}

function showCompletion(box, choice) {
  box.replaceChildren();
  box.dataset.text = choice.message.content;
  for (const e of (choice.logprobs && choice.logprobs.content) || []) {
    const tok = document.createElement("span");
    tok.textContent = e.token;
    tok.title = `token id ${e.token_id}, log-probability ${e.logprob.toFixed(4)}`;
    const lp = document.createElement("span");
    lp.className = "lp";
    lp.textContent = e.logprob.toFixed(2);
    box.append(tok, lp);
  }
  if (!box.children.length) box.textContent = choice.message.content;
}

async function vectorFromCapture() {
  if (!S.run || !S.run.kinds.resid) throw new Error("run with the residual stream captured first");
  const m = $("steer-site").value.match(/blocks\.(\d+)\.hook_resid_post/);
  const layer = m ? Number(m[1]) : Number($("colour-layer").value);
  const res = await api("/v1/vectors", {
    body: { name: `mean residual L${layer}`, from_capture: { capture_id: S.run.captureId, hook_id: `L${layer}.resid` } },
  });
  const v = await res.json();
  await loadVectors(v.vector_id);
  status(`stored ${v.vector_id}`);
}

// --- attribution patching ------------------------------------------------------------------
const ATTR = { w: 24, h: 12, left: 34, top: 70 };

async function attribute() {
  status("attributing…");
  const res = await api("/v1/attribution", {
    body: {
      clean: { prompt: $("attr-clean").value }, corrupted: { prompt: $("attr-corrupted").value },
      metric: { type: "logit_diff", token_ids: [Number($("attr-a").value), Number($("attr-b").value)] },
    },
  });
  const out = await res.json();
  const maps = new Map(); // component -> Map(layer -> Float64Array(positions))
  const nPos = out.n_tokens || out.clean_tokens.length;
  for (const a of out.attributions) {
    const m = a.layer_name.match(/(\d+)/);
    const layer = m ? Number(m[1]) : 0;
    if (!maps.has(a.component)) maps.set(a.component, new Map());
    const byLayer = maps.get(a.component);
    if (!byLayer.has(layer)) byLayer.set(layer, new Float64Array(nPos));
    byLayer.get(layer)[a.position] += a.estimate; // per-head sites: summed over heads
  }
  const box = $("attr-maps");
  box.replaceChildren();
  for (const [component, byLayer] of maps) box.append(attributionMap(component, byLayer, nPos, out.clean_tokens));
  status(`attribution: clean ${out.clean_metric.toFixed(3)}, corrupted ${out.corrupted_metric.toFixed(3)}`);
}

function attributionMap(component, byLayer, nPos, tokens) {
  const layers = [...byLayer.keys()].sort((a, b) => a - b);
  let max = 1e-12;
  for (const row of byLayer.values()) for (const v of row) max = Math.max(max, Math.abs(v));
  const div = document.createElement("div");
  div.className = "attr-map";
  const title = document.createElement("h3");
  title.textContent = `${component} (±${max.toPrecision(3)})`;
  const c = document.createElement("canvas");
  c.dataset.component = component;
  c.width = ATTR.left + nPos * ATTR.w;
  c.height = ATTR.top + layers.length * ATTR.h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(nPos, layers.length);
  layers.forEach((l, li) => {
    const row = byLayer.get(l);
    for (let p = 0; p < nPos; p++) {
      const t = Math.min(1, Math.abs(row[p]) / max), q = (li * nPos + p) * 4;
      const rgb = row[p] >= 0 ? [255, 255 - 195 * t, 255 - 215 * t] : [255 - 215 * t, 255 - 165 * t, 255];
      img.data.set([...rgb, 255], q);
    }
  });
  const tmp = document.createElement("canvas");
  tmp.width = nPos;
  tmp.height = layers.length;
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, ATTR.left, ATTR.top, nPos * ATTR.w, layers.length * ATTR.h);
  ctx.font = "10px ui-monospace, monospace";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillStyle = "#333";
  layers.forEach((l, li) => ctx.fillText("L" + l, ATTR.left - 3, ATTR.top + (li + 0.5) * ATTR.h));
  ctx.save();
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "left";
  for (let p = 0; p < nPos; p++) ctx.fillText(clip(tokens[p] || ""), -ATTR.top + 3, ATTR.left + (p + 0.5) * ATTR.w);
  ctx.restore();
  Object.assign(c.dataset, { w: ATTR.w, h: ATTR.h, left: ATTR.left, top: ATTR.top });
  c.addEventListener("mousemove", (ev) => {
    const li = Math.floor((ev.offsetY - ATTR.top) / ATTR.h), p = Math.floor((ev.offsetX - ATTR.left) / ATTR.w);
    if (li < 0 || p < 0 || li >= layers.length || p >= nPos) return;
    $("attr-hover").textContent = `${component} layer ${layers[li]} position ${p} ${JSON.stringify(tokens[p])}: ` +
      `${byLayer.get(layers[li])[p].toPrecision(5)}`;
  });
  div.append(title, c);
  return div;
}

// --- wiring -------------------------------------------------------------------------------
function on(id, event, fn) {
  $(id).addEventListener(event, (ev) => {
    if (event === "submit") ev.preventDefault();
    Promise.resolve(fn(ev)).catch(fail);
  });
}

async function start() {
  await loadModel();
  const linked = linkedState();
  if (linked && linked.r) {
    setRequest(linked.r);
    S.pendingView = linked.v || null;
    await run();
  } else {
    status("ready");
    document.body.dataset.ready = "1";
  }
}

function init() {
  on("run-form", "submit", run);
  on("share", "click", () => shareLink());
  on("colour-mode", "change", colourTokens);
  for (const k of ["layer", "neuron", "head", "source"]) on("colour-" + k, "input", colourTokens);
  on("tokens", "click", (ev) => {
    const pos = ev.target.dataset && ev.target.dataset.pos;
    if (pos === undefined) return;
    if ($("colour-mode").value === "attn") {
      $("colour-source").value = pos;
      colourTokens().then(() => tokenInfo(Number(pos)));
    } else {
      tokenInfo(Number(pos));
    }
  });
  $("detail-canvas").addEventListener("mousemove", detailHover);
  $("lens-canvas").addEventListener("mousemove", lensHover);
  on("steer-form", "submit", steer);
  on("steer-make-vector", "click", vectorFromCapture);
  on("attr-form", "submit", attribute);
  on("key-form", "submit", () => {
    S.key = $("api-key").value.trim() || null;
    if (S.key) sessionStorage.setItem(KEY_STORE, S.key);
    else sessionStorage.removeItem(KEY_STORE);
    $("key-form").hidden = true;
    return start();
  });
  start().catch(fail);
}

init();
