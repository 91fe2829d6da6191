"""Attribution patching: every site's effect on a metric, from one backward pass.

Activation patching asks, for each site and position, how much a metric M (a logit
difference, a log-probability at the last position) moves when the corrupted run gets the
clean run's activation there. Attribution patching (AtP) estimates all of them at once with
the first-order Taylor term at the corrupted run:

    effect(site, pos) ~ (a_clean - a_corrupted)[pos] . dM/da[pos]   (per head on per-head sites)

`dM/da` comes from MLX autograd: the corrupted prompt runs once through the model (one forward
over the whole prompt, no KV cache) with an internal intervention at each site that ADDS a delta
(zeros, the site's engine layout), through the same capture machinery as every intervention
(engine/capture.py); `mx.value_and_grad` over the deltas gives dM/d(delta) = dM/da, and the
same pass records the corrupted activations. The clean activations come from one forward of
the clean prompt. `verify_top` then runs real activation patching (the interventions' `patch`
op, one site, position and head at a time) on the K largest estimates, so a caller sees
where the linear estimate holds; a deadline skips the patches not started by then.

Method "atp*" is AtP* (Kramar, Lieberum, Shah, Nanda 2024, arXiv:2403.00745, section 3.1): the QK fix
recomputes the attention softmax exactly for query and key sites and linearises only after it
(`_qk_fixed`), and GradDrop reruns the backward pass once per layer with that layer's attention and MLP
outputs cut from the gradient and reports a ranking score per row (`graddrop`), by which verify_top
then picks rows. `attribution_arrow` writes an answer as one Arrow IPC stream.

`plan_attribution` checks and tokenizes (no MLX work; any thread), `run_attribution` computes
(the MLX thread). Errors are InvalidArgument naming the argument (`clean`, `metric.token_ids[1]`,
`sites[2].layer_name`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Union

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import vocabulary
from engine.capture import Capture
from engine.errors import ContextLengthExceeded, InvalidArgument
from engine.generate import token_texts
from engine.hooks import HookTarget, hook_specs, resolve_hook
from engine.interventions import Intervention, SourceTensor, resolve_interventions
from engine.model import LoadedModel
from engine.params import HookSpec, InterventionSpec, parse
from engine.plan import check_vocabulary, prompt_ids

METHODS = ("atp", "atp*")
_STRICT = ConfigDict(strict=True, extra="forbid")


class LogitDiffMetric(BaseModel):
    """logit(token_ids[0]) - logit(token_ids[1]) at the last position."""

    model_config = _STRICT
    type: Literal["logit_diff"]
    token_ids: list[int] = Field(min_length=2, max_length=2)


class LogprobMetric(BaseModel):
    """log p(token_id) at the last position (float32 log-softmax)."""

    model_config = _STRICT
    type: Literal["logprob"]
    token_id: int


Metric = Union[LogitDiffMetric, LogprobMetric]


@dataclass(frozen=True)
class AttributionSite:
    """A resolved site: the tensor (as a hook target) and the name the caller gave it."""

    target: HookTarget
    layer_name: str
    component: str | None  # as the caller gave it (None: the layer name says it)
    per_head: bool  # one estimate per head (the heads of the tensor as the model computes it)


@dataclass(frozen=True)
class AttributionPlan:
    lm: LoadedModel = field(repr=False, compare=False)
    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    metric: Metric
    sites: tuple[AttributionSite, ...]
    method: str = "atp"
    verify_top: int = 0


def default_sites(lm: LoadedModel) -> list[dict]:
    """Every layer's attention, MLP and residual (block) output, in model order."""
    return [{"layer_name": f"blocks.{i}.{hook}"} for i in range(lm.info.n_layers)
            for hook in ("hook_attn_out", "hook_mlp_out", "hook_resid_post")]


def plan_attribution(lm: LoadedModel, *, clean: dict, corrupted: dict, metric: Metric | dict,
                     sites: Iterable[HookSpec | dict] | None = None, method: str = "atp",
                     verify_top: int | None = None) -> AttributionPlan:
    """Check and tokenize an attribution request. `clean`/`corrupted`: {"messages": [...]} or
    {"prompt": text or token ids}, of equal token counts. `metric`: {"type": "logit_diff",
    "token_ids": [a, b]} or {"type": "logprob", "token_id": a}. `sites`: hook specs (default:
    `default_sites`). Touches no MLX array."""
    ids = {}
    for arg, value in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(value, dict) or set(value) - {"messages", "prompt"}:
            raise InvalidArgument(f"{arg} must be an object with 'messages' (a chat) or 'prompt' (text or token ids)",
                                  arg)
        try:
            tokens, given = prompt_ids(lm, messages=value.get("messages"), prompt=value.get("prompt"))
        except InvalidArgument as exc:
            raise type(exc)(f"{arg}: {exc.message}", f"{arg}.{exc.arg}" if exc.arg else arg) from None
        limit = lm.info.context_length
        if len(tokens) > limit:
            raise ContextLengthExceeded(f"{arg} has {len(tokens)} tokens, over this model's context length of "
                                        f"{limit}", f"{arg}.{given}")
        ids[arg] = tokens
    if len(ids["clean"]) != len(ids["corrupted"]):
        raise InvalidArgument(
            f"clean has {len(ids['clean'])} tokens and corrupted has {len(ids['corrupted'])}: attribution compares "
            "the two runs position by position, so both must tokenize to the same length", "corrupted")

    if not isinstance(metric, BaseModel):
        if not isinstance(metric, dict) or metric.get("type") not in ("logit_diff", "logprob"):
            raise InvalidArgument("metric must be {\"type\": \"logit_diff\", \"token_ids\": [a, b]} or "
                                  "{\"type\": \"logprob\", \"token_id\": a}", "metric.type")
        metric = parse(LogitDiffMetric if metric["type"] == "logit_diff" else LogprobMetric, "metric", **metric)
    vocab = lm.info.vocab_size
    if isinstance(metric, LogitDiffMetric):
        check_vocabulary(metric.token_ids, vocab, "metric.token_ids")
    else:
        if not 0 <= metric.token_id < vocab:
            raise InvalidArgument(f"metric.token_id is token id {metric.token_id}, outside the model's vocabulary "
                                  f"(ids 0 to {vocab - 1})", "metric.token_id")

    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)} (got {method!r})", "method")
    if verify_top is not None and (isinstance(verify_top, bool) or not isinstance(verify_top, int)
                                   or verify_top < 0):
        raise InvalidArgument(f"verify_top must be a non-negative integer (got {verify_top!r})", "verify_top")

    specs = hook_specs(default_sites(lm) if sites is None else sites, "sites")
    if not specs:
        raise InvalidArgument("sites is empty: name at least one site, or leave it out for every layer's "
                              "attention, MLP and residual output", "sites")
    resolved = []
    for i, spec in enumerate(specs):
        where = f"sites[{i}]"
        if spec.capture_input or not spec.capture_output:  # a hook_id is accepted and plays no part
            bad = "capture_input" if spec.capture_input else "capture_output"
            raise InvalidArgument(f"{where}: a site is one tensor, named by layer_name (and component); {bad} does "
                                  "not apply (name an input with a TransformerLens name such as "
                                  "blocks.N.hook_resid_pre)", f"{where}.{bad}")
        resolved.append(_resolve_site(lm, spec, where))
    return AttributionPlan(lm, tuple(ids["clean"]), tuple(ids["corrupted"]), metric, tuple(resolved), method,
                           verify_top or 0)


def _resolve_site(lm: LoadedModel, spec: HookSpec, where: str) -> AttributionSite:
    (target,) = resolve_hook(lm, spec, where)
    site = vocabulary.Site(target.site, target.layer, target.component, target.is_input)
    refusal = vocabulary.intervention_refusal(site, named_by_component=spec.component is not None)
    if refusal is not None:
        message, f = refusal
        raise InvalidArgument(f"{where}: {message}", f"{where}.{f}")
    return AttributionSite(target, spec.layer_name, spec.component, vocabulary.COMPONENTS[target.component].per_head)


# --- the computation (MLX thread) -------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Delta(Intervention):
    """Internal: adds `vector` (a traced delta of the site's full engine shape, [1, T, ...]; None: adds
    nothing) at every position, and keeps what the site computed before the add (without the batch axis:
    a new array, so a model that adds in place to what the site returned, as gpt2 does to its embedding
    with `+=`, does not change it)."""

    seen: list = field(default_factory=list)

    def apply(self, x: mx.array, start: int) -> tuple[mx.array, int]:
        self.seen.append(x[0])
        n = x.shape[2 if self.per_head else 1]
        return (x if self.vector is None else x + self.vector.astype(x.dtype)), n


def _delta(site: AttributionSite, index: int, delta: mx.array | None) -> _Delta:
    t = site.target
    spec = InterventionSpec(layer_name=site.layer_name, op="add")
    return _Delta(index, spec, t.site, t.layer, t.component, t.is_input, "all", 0, None, None, delta)


def _metric(metric: Metric, logits: mx.array) -> mx.array:
    """The metric from the last position's logits [vocab] (float32)."""
    logits = logits.astype(mx.float32)
    if isinstance(metric, LogitDiffMetric):
        a, b = metric.token_ids
        return logits[a] - logits[b]
    return logits[metric.token_id] - mx.logsumexp(logits, axis=-1)


def _run(lm: LoadedModel, ids: tuple[int, ...], metric: Metric, sites, deltas: list[mx.array | None],
         interventions: list[Intervention] = (), targets: list[HookTarget] = ()):
    """The metric of `ids` with `deltas` added at `sites` (and `interventions` applied after them), each
    site's activation before the add (engine layout without the batch axis: [T, ...] or [heads, T, ...]),
    and what `targets` recorded (one forward each, without the batch axis)."""
    ivs = [_delta(s, i, d) for i, (s, d) in enumerate(zip(sites, deltas))]
    ivs += list(interventions)
    capture = Capture(lm, list(targets), interventions=ivs)
    with capture.installed(lm):
        capture.begin_step(0, 0)
        logits = lm.model(mx.array(ids)[None])
        capture.end_step()
    seen = []
    for iv in ivs[:len(sites)]:
        if len(iv.seen) != 1:
            raise RuntimeError(f"site {iv.spec.layer_name} was reached {len(iv.seen)} times in one forward pass")
        seen.append(iv.seen[0])
    recorded = [rec.steps[0].array for rec in capture.records]
    return _metric(metric, logits[0, -1]), seen, recorded


def run_attribution(plan: AttributionPlan, deadline: float | None = None) -> dict[str, Any]:
    """Run a plan: the clean and corrupted metrics, one estimate per site, position (and head), and the
    K largest verified by real patching. `deadline` (time.monotonic()) bounds the verifying patches: those
    not started by then are reported with `patched: None` and `skipped: True`."""
    lm, sites, n = plan.lm, list(plan.sites), len(plan.corrupted)
    star = plan.method == "atp*"
    aux = _qk_aux(lm, sites) if star else {}
    aux_sites = [s for layer in aux.values() for s in layer.values()]
    every = sites + aux_sites
    clean_metric, clean_acts, _ = _run(lm, plan.clean, plan.metric, every, [None] * len(every))
    mx.eval(clean_metric, *clean_acts)
    clean_np = [np.array(c.astype(mx.float32)) for c in clean_acts[:len(sites)]]
    # Scores of the layers whose queries or keys are sites (the QK fix recomputes their softmax).
    score_targets = [resolve_hook(lm, HookSpec(layer_name=f"blocks.{layer}.attn.hook_attn_scores"))[0]
                     for layer in aux]

    # The deltas take each site's shape as the model computes it (the same for both runs).
    zeros = [mx.zeros((1, *a.shape), dtype=mx.float32) for a in clean_acts]

    def gradients(stops: list[Intervention]):
        """One forward and backward of the corrupted run (with `stops` in place): the metric, each site's
        activation and d metric / d activation (numpy float32, without the batch axis), the scores.
        d metric / d delta at delta = 0 is d metric / d activation."""
        run = lambda deltas: _run(lm, plan.corrupted, plan.metric, every, deltas, stops, score_targets)  # noqa: E731
        (value, acts, scores), grads = mx.value_and_grad(run)(zeros)
        mx.eval(value, acts, grads, scores)
        f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
        return float(value.item()), [f32(a) for a in acts], [f32(g)[0] for g in grads], [f32(x) for x in scores]

    corrupted_metric, acts, grads, scores = gradients([])
    estimates = _estimates(lm, sites, clean_np, acts, grads, aux, scores)
    graddrop = None
    if star:
        # GradDrop (Kramar et al. 2024, section 3.1.2, the GradDrop estimator; written from the paper's
        # definition, equation number not checked against the text):
        #     c_GradDrop(n) = 1 / (L - 1) * sum_{l=1..L} | c_AtP+GD_l(n) |
        # where c_AtP+GD_l is the (QK-fixed) estimate with the gradient through layer l's contribution to
        # the residual stream (its attention and MLP outputs) set to zero. A node whose effect cancels
        # between a direct path and a path through some layer l gets a large |c_AtP+GD_l| although its
        # plain estimate is near 0. For a node in layer l itself GD_l gives 0; the other L - 1 terms equal
        # the plain estimate where nothing downstream cancels, hence the normalisation.
        n_layers = lm.info.n_layers
        total = [np.zeros_like(e, dtype=np.float64) for e in estimates]
        for layer in range(n_layers):
            _, acts_l, grads_l, scores_l = gradients(_stops(lm, layer))
            for t, e in zip(total, _estimates(lm, sites, clean_np, acts_l, grads_l, aux, scores_l)):
                t += np.abs(e)
        graddrop = [t / max(n_layers - 1, 1) for t in total]

    attributions = []
    for i, (site, per) in enumerate(zip(sites, estimates)):
        for pos in range(n):
            heads = range(per.shape[0]) if site.per_head else [None]
            for h in heads:
                at = (h, pos) if h is not None else pos
                row = _row(site, pos, h, float(per[at]))
                if graddrop is not None:
                    row["graddrop"] = float(graddrop[i][at])
                attributions.append(row)
    out = {"method": plan.method, "metric": plan.metric.model_dump(), "n_tokens": n,
           "clean_tokens": token_texts(lm.tokenizer, list(plan.clean)),
           "corrupted_tokens": token_texts(lm.tokenizer, list(plan.corrupted)),
           "clean_metric": float(clean_metric.item()), "corrupted_metric": corrupted_metric,
           "attributions": attributions}
    if plan.verify_top:
        out["verified"] = _verify(plan, sites, clean_np, attributions, out["corrupted_metric"], deadline)
        out["verify_skipped"] = sum(1 for v in out["verified"] if v.get("skipped"))
    return out


# --- AtP*: the QK fix and GradDrop ------------------------------------------------------------------
_QK_AUX = {"z": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def _qk_aux(lm: LoadedModel, sites: list[AttributionSite]) -> dict[int, dict[str, AttributionSite]]:
    """For each layer whose queries or keys are sites: internal sites that give the corrupted run's
    queries, keys, values and d metric / d (each head's attention output)."""
    layers = sorted({s.target.layer for s in sites if s.target.component in ("query", "key")})
    aux = {}
    for layer in layers:
        aux[layer] = {}
        for key, hook in _QK_AUX.items():
            name = f"blocks.{layer}.{hook}"
            aux[layer][key] = _resolve_site(lm, parse(HookSpec, None, layer_name=name), f"atp* ({name})")
    return aux


@dataclass(frozen=True, eq=False)
class _Stop(Intervention):
    """Internal (GradDrop): passes its site's tensor on unchanged and stops the gradient through it."""

    def apply(self, x: mx.array, start: int) -> tuple[mx.array, int]:
        return mx.stop_gradient(x), x.shape[1]


def _stops(lm: LoadedModel, layer: int) -> list[Intervention]:
    """Stop the gradient through layer `layer`'s attention and MLP outputs (what it adds to the residual)."""
    out = []
    for i, hook in enumerate(("hook_attn_out", "hook_mlp_out")):
        (t,) = resolve_hook(lm, HookSpec(layer_name=f"blocks.{layer}.{hook}"))
        spec = InterventionSpec(layer_name=t.layer_name, op="add")
        out.append(_Stop(-1 - i, spec, t.site, t.layer, t.component, t.is_input, "all", 0, None, None))
    return out


def _estimates(lm: LoadedModel, sites: list[AttributionSite], clean: list[np.ndarray], acts: list[np.ndarray],
               grads: list[np.ndarray], aux: dict, scores: list[np.ndarray]) -> list[np.ndarray]:
    """Each site's estimates, [T] or [heads, T]: (a_clean - a_corrupted) . dM/da, except queries and keys of
    the layers in `aux` (atp*), whose softmax is recomputed (`_qk_fixed`)."""
    n = len(sites)
    out = [((c - a) * g).sum(axis=-1) for c, a, g in zip(clean, acts[:n], grads[:n])]
    if not aux:
        return out
    at = n
    layer_data = {}
    for (layer, parts), s in zip(aux.items(), scores):
        names = list(parts)
        layer_data[layer] = {**{k: acts[at + j] for j, k in enumerate(names)},
                             "dz": grads[at + names.index("z")], "scores": s}
        at += len(names)
    for i, site in enumerate(sites):
        if site.target.component in ("query", "key"):
            layer = site.target.layer
            out[i] = _qk_fixed(lm, layer, site.target.component, clean[i], layer_data[layer])
    return out


def _qk_fixed(lm: LoadedModel, layer: int, component: str, clean: np.ndarray, d: dict) -> np.ndarray:
    """AtP*'s QK fix (Kramar et al. 2024, section 3.1.1): a query or key reaches the metric only through its
    layer's attention softmax, where the linear estimate fails when the softmax saturates. So compute the
    attention probabilities exactly with the clean query (or key) patched in, and linearise only after the
    softmax:
        c_Q(q_t) = sum_s (softmax_s(S_t + dS_t) - P_ts) * dM/dP_ts,   dS_ts = scale (q_clean - q)_t . k_s
        c_K(k_s) = sum_t sum_s' (softmax_s'(S_t + e_s dS_ts) - P_ts') * dM/dP_ts',   dS_ts = scale q_t . (k_clean - k)_s
    per head (a key head sums over the query heads that share it). dM/dP_ts = dM/dz_t . v_s, where z is the
    head's attention output (sum_s P_ts v_s): so no pattern is ever materialised in the backward pass.
    Rows with attention sinks keep the sink's logit in the normalisation. Returns [heads, T]."""
    q, k, v, dz = (d[x].astype(np.float64) for x in ("q", "k", "v", "dz"))
    scores = d["scores"].astype(np.float64)  # [H, T, T], -inf where masked
    n_heads, n_kv = q.shape[0], k.shape[0]
    group = np.arange(n_heads) // (n_heads // n_kv)  # query head -> its key/value head
    raw = np.einsum("htd,hsd->hts", q, k[group])
    seen = np.isfinite(scores)
    scale = float((scores[seen] * raw[seen]).sum() / max((raw[seen] ** 2).sum(), 1e-30))
    if np.abs(scores[seen] - scale * raw[seen]).max() > 1e-3 * max(np.abs(scores[seen]).max(), 1.0):
        raise InvalidArgument(f"atp*: layer {layer}'s attention scores are not scale * q . k on this architecture "
                              "(its keys or queries reach the scores in more ways than the sites), so its QK fix is "
                              "not available; use method 'atp' or leave out its query and key sites", "method")
    grad_p = np.einsum("htd,hsd->hts", dz, v[group])  # dM/dP [H, T, T]
    sinks = getattr(lm.arch.module(lm.model, "attn", layer), "sinks", None)
    sink = None if sinks is None else np.broadcast_to(np.array(sinks.astype(mx.float32), np.float64)[:, None, None],
                                                      (*scores.shape[:2], 1))

    def log_softmax(s: np.ndarray) -> np.ndarray:  # over the real columns and the sink, if any
        full = s if sink is None else np.concatenate([s, sink], axis=-1)
        top = full.max(axis=-1, keepdims=True)
        lse = top + np.log(np.exp(full - top).sum(axis=-1, keepdims=True))
        return s - lse

    logp = log_softmax(scores)
    p = np.exp(logp)
    mean = (p * grad_p).sum(axis=-1)  # [H, T]: sum_s P_ts dM/dP_ts
    if component == "query":
        shift = scale * np.einsum("htd,hsd->hts", clean.astype(np.float64) - q, k[group])
        patched = np.exp(log_softmax(scores + shift))
        return ((patched - p) * grad_p).sum(axis=-1)
    # A key changes one column s of every row: p'_s = p_s e^d / Z, the others p / Z, Z = 1 - p_s + p_s e^d,
    # so sum_s' (p' - p) dM/dP = (p'_s - p_s) / (1 - p_s) ... written stably as w = p_s e^d:
    #     (w - p_s) / (1 - p_s + w) * (dM/dP_s - sum_s' p_s' dM/dP_s')
    shift = scale * np.einsum("htd,hsd->hts", q, (clean.astype(np.float64) - k)[group])
    w = np.exp(np.minimum(logp + shift, 700.0))
    frac = (w - p) / (1.0 - p + w)
    per = (frac * (grad_p - mean[..., None])).sum(axis=1)  # [H, T_k]: summed over query positions
    out = np.zeros((n_kv, per.shape[1]))
    np.add.at(out, group, per)
    return out


def _row(site: AttributionSite, pos: int, head: int | None, estimate: float) -> dict:
    row = {"layer_name": site.layer_name, "component": site.target.component, "position": pos}
    if head is not None:
        row["head"] = head
    row["estimate"] = estimate
    return row


def _verify(plan: AttributionPlan, sites, clean_acts: list[np.ndarray], attributions: list[dict],
            corrupted_metric: float, deadline: float | None = None) -> list[dict]:
    """Real activation patching (the `patch` intervention) of the K largest |estimate|s (atp*: the largest
    GradDrop scores), one at a time; those not started by `deadline` are skipped (`patched`: None)."""
    lm, n = plan.lm, len(plan.corrupted)
    # Each attribution row's site, in order (rows are site-major).
    owners = [s for s, a in zip(sites, clean_acts) for _ in range(n * (a.shape[0] if s.per_head else 1))]
    rank = (lambda r: -r["graddrop"]) if plan.method == "atp*" else (lambda r: -abs(r["estimate"]))
    order = sorted(range(len(attributions)), key=lambda i: rank(attributions[i]))[:plan.verify_top]
    by_site = {id(s): i for i, s in enumerate(sites)}
    out = []
    for i in order:
        row, site = attributions[i], owners[i]
        if deadline is not None and time.monotonic() > deadline:
            out.append({**row, "patched": None, "skipped": True})
            continue
        acts = clean_acts[by_site[id(site)]]  # engine layout without the batch axis: [T, ...] or [H, T, d]
        data = acts.transpose(1, 0, 2) if site.per_head else acts  # token-major
        t = site.target
        source = SourceTensor(t.component, t.layer, t.is_input, np.arange(n), np.ascontiguousarray(data, np.float32),
                              n)
        spec = InterventionSpec(layer_name=site.layer_name, component=site.component,
                                op="patch", positions=[row["position"]],
                                heads=[row["head"]] if "head" in row else None,
                                source={"capture_id": "clean", "hook_id": "site"})
        try:
            (patch,) = resolve_interventions(lm, [spec], n, sources=lambda _c, _h: source, arg="verify")
        except InvalidArgument as exc:  # e.g. a site whose tensor's shape the model's dimensions do not describe
            raise InvalidArgument(f"verify_top: {site.layer_name} cannot be patched on this model, so its estimates "
                                  f"cannot be verified ({exc.message}); leave that site out or verify fewer rows",
                                  "verify_top") from None
        value, _, _ = _run(lm, plan.corrupted, plan.metric, [], [], [patch])
        out.append({**row, "patched": float(value.item()) - corrupted_metric})
    return out



# --- the answer as Arrow ---------------------------------------------------------------------------
ARROW_STREAM = "application/vnd.apache.arrow.stream"


def attribution_arrow(result: dict) -> bytes:
    """An attribution answer as one Arrow IPC stream: a row per site, position and head (columns
    layer_name, component, position, head (null on whole-site rows), estimate, and graddrop with atp*);
    everything else (metrics, tokens, method, verified rows) JSON-encoded in the schema's metadata,
    one key per field of the JSON answer."""
    import json

    import pyarrow as pa

    rows = result["attributions"]
    columns = {
        "layer_name": pa.array([r["layer_name"] for r in rows], pa.string()),
        "component": pa.array([r["component"] for r in rows], pa.string()),
        "position": pa.array([r["position"] for r in rows], pa.int32()),
        "head": pa.array([r.get("head") for r in rows], pa.int32()),
        "estimate": pa.array([r["estimate"] for r in rows], pa.float64()),
    }
    if rows and "graddrop" in rows[0]:
        columns["graddrop"] = pa.array([r["graddrop"] for r in rows], pa.float64())
    metadata = {k: json.dumps(v) for k, v in result.items() if k != "attributions"}
    table = pa.table(columns).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
