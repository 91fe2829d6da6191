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
where the linear estimate holds.

`plan_attribution` checks and tokenizes (no MLX work; any thread), `run_attribution` computes
(the MLX thread). Errors are InvalidArgument naming the argument (`clean`, `metric.token_ids[1]`,
`sites[2].layer_name`).
"""

from __future__ import annotations

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
    if method == "atp*":
        raise InvalidArgument("method 'atp*' is not implemented yet; use 'atp'", "method")
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
         interventions: list[Intervention] = ()):
    """The metric of `ids` with `deltas` added at `sites` (and `interventions` applied), and each site's
    activation before the add (engine layout without the batch axis: [T, ...] or [heads, T, ...])."""
    ivs = [_delta(s, i, d) for i, (s, d) in enumerate(zip(sites, deltas))]
    ivs += list(interventions)
    capture = Capture(lm, [], interventions=ivs)
    with capture.installed(lm):
        capture.begin_step(0, 0)
        logits = lm.model(mx.array(ids)[None])
        capture.end_step()
    seen = []
    for iv in ivs[:len(sites)]:
        if len(iv.seen) != 1:
            raise RuntimeError(f"site {iv.spec.layer_name} was reached {len(iv.seen)} times in one forward pass")
        seen.append(iv.seen[0])
    return _metric(metric, logits[0, -1]), seen


def run_attribution(plan: AttributionPlan) -> dict[str, Any]:
    """Run a plan: the clean and corrupted metrics, one estimate per site, position (and head), and the
    K largest verified by real patching."""
    lm, sites, n = plan.lm, list(plan.sites), len(plan.corrupted)
    clean_metric, clean_acts = _run(lm, plan.clean, plan.metric, sites, [None] * len(sites))
    mx.eval(clean_metric, *clean_acts)
    # The deltas take each site's shape as the model computes it (the same for both runs).
    zeros = [mx.zeros((1, *a.shape), dtype=mx.float32) for a in clean_acts]

    # d metric / d delta at delta = 0 is d metric / d activation; the pass also records the activations.
    run_corrupted = lambda deltas: _run(lm, plan.corrupted, plan.metric, sites, deltas)  # noqa: E731
    (corrupted_metric, corrupted_acts), grads = mx.value_and_grad(run_corrupted)(zeros)
    mx.eval(corrupted_metric, corrupted_acts, grads)

    attributions = []
    clean_np = []
    for site, clean, corrupt, grad in zip(sites, clean_acts, corrupted_acts, grads):
        c = np.array(clean.astype(mx.float32))
        diff = c - np.array(corrupt.astype(mx.float32))
        g = np.array(grad.astype(mx.float32))[0]
        per = (diff * g).sum(axis=-1)  # [T] or [H, T]
        clean_np.append(c)
        for pos in range(n):
            if site.per_head:
                for h in range(per.shape[0]):
                    attributions.append(_row(site, pos, h, float(per[h, pos])))
            else:
                attributions.append(_row(site, pos, None, float(per[pos])))
    out = {"method": plan.method, "metric": plan.metric.model_dump(), "n_tokens": n,
           "clean_tokens": token_texts(lm.tokenizer, list(plan.clean)),
           "corrupted_tokens": token_texts(lm.tokenizer, list(plan.corrupted)),
           "clean_metric": float(clean_metric.item()), "corrupted_metric": float(corrupted_metric.item()),
           "attributions": attributions}
    if plan.verify_top:
        out["verified"] = _verify(plan, sites, clean_np, attributions, out["corrupted_metric"])
    return out


def _row(site: AttributionSite, pos: int, head: int | None, estimate: float) -> dict:
    row = {"layer_name": site.layer_name, "component": site.target.component, "position": pos}
    if head is not None:
        row["head"] = head
    row["estimate"] = estimate
    return row


def _verify(plan: AttributionPlan, sites, clean_acts: list[np.ndarray], attributions: list[dict],
            corrupted_metric: float) -> list[dict]:
    """Real activation patching (the `patch` intervention) of the K largest |estimate|s, one at a time."""
    lm, n = plan.lm, len(plan.corrupted)
    # Each attribution row's site, in order (rows are site-major).
    owners = [s for s, a in zip(sites, clean_acts) for _ in range(n * (a.shape[0] if s.per_head else 1))]
    order = sorted(range(len(attributions)), key=lambda i: -abs(attributions[i]["estimate"]))[:plan.verify_top]
    by_site = {id(s): i for i, s in enumerate(sites)}
    out = []
    for i in order:
        row, site = attributions[i], owners[i]
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
        value, _ = _run(lm, plan.corrupted, plan.metric, [], [], [patch])
        out.append({**row, "patched": float(value.item()) - corrupted_metric})
    return out

