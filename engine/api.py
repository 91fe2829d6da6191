"""The engine's public API: a loaded model that generates and captures, with no server.

For same-host Python (a notebook, a script) and for control/, which serves it over HTTP:

    import engine
    model = engine.load("default")  # or a model folder, a .gguf file, a Hugging Face repo id
    hook = model.register_activation_hook(layer_name="transformer.h.5", component="residual")
    out = model.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    out.text, out.activations[hook]  # [positions, 576]: the prompt, then every generated token
    out = model.generate(prompt="The capital of France is", max_tokens=1, temperature=0,
                         logprobs=True, top_logprobs=5, logprob_token_ids=[12366])
    out.logprobs[0].top, out.logprobs[0].targets  # [(token id, log-probability), ...]
    for event in model.stream(prompt="Once upon a time", max_tokens=8):
        print(event.text, end="")
    outs = model.generate_many([{"prompt": t, "max_tokens": 16} for t in texts])  # decoded together

`generate`/`stream` are conveniences over the two steps control/ uses: `plan(...)` resolves
and checks a request (no MLX work; any thread) and `run(plan)` generates (one thread at a
time, the MLX one). Errors are engine.errors' InvalidArgument family, naming the argument.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from engine.attribution import AttributionPlan, plan_attribution, run_attribution
from engine.batch import Batch, batchable, can_join
from engine.errors import InvalidArgument
from engine.generate import Completion, TokenEvent, generate
from engine.hooks import hook_points, resolve_hook
from engine.interventions import Sources
from engine.model import LoadedModel, ModelInfo, load_model
from engine.params import CaptureOptions, HookSpec, InterventionSpec, LogprobOptions, SamplingParams, parse
from engine.plan import GenerationPlan, plan
from engine.progress import Progress
from engine.vectors import VectorStore

__all__ = ["load", "Model", "Completion", "TokenEvent", "GenerationPlan", "REGISTERED"]


class _Registered:
    def __repr__(self) -> str:
        return "<registered hooks>"


REGISTERED: Any = _Registered()  # `hooks=` default of generate/stream: the model's registered hooks


def load(model_path: str = "default", model_id: str | None = None, *, progress: Progress | None = None) -> "Model":
    """Load a model: "default" (SmolLM2-135M-Instruct, fetched and converted once), an mlx-lm
    folder, a .gguf file (converted once to float32) or a Hugging Face repo id (online)."""
    from engine.default_model import MODEL_ID, default_model_dir, ensure_default_model

    if model_path == "default":
        model_path = str(ensure_default_model())
        model_id = model_id or MODEL_ID
    elif isinstance(model_path, str) and model_path.strip() and \
            Path(model_path).expanduser().resolve() == default_model_dir().resolve():
        model_id = model_id or MODEL_ID  # the same id however the default model is named
    return Model(load_model(model_path, model_id, progress=progress))


class Model:
    """A loaded model, its registered activation hooks, and generation.

    Registered hooks are captured by `generate`/`stream` unless they are given other hooks; a
    plan snapshots them, so registering while a generation runs affects only later ones."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm  # for engine-internal use (capture, benchmarks)
        self.vectors = VectorStore({**lm.info.dims, "n_layers": lm.info.n_layers})  # for interventions' vector_id
        self._hooks: tuple[HookSpec, ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        i = self.info
        return f"<engine.Model {i.model_id} ({i.architecture}, {i.n_layers} layers, d_model {i.d_model})>"

    @property
    def info(self) -> ModelInfo:
        return self.lm.info

    # --- activation hooks ---------------------------------------------------------------
    @property
    def activation_hooks(self) -> list[HookSpec]:
        """The registered hooks, in registration order, each with its hook_id."""
        return list(self._hooks)

    def register_activation_hook(self, layer_name: str, component: str | None = None, *, hook_id: str | None = None,
                                 capture_input: bool = False, capture_output: bool = True) -> str:
        """Register a hook for later generations; returns its id (default: the TransformerLens
        name, or `<layer_name>.<component>`). Checked now: UnknownHook for a name the model
        does not have, InvalidArgument for other mistakes (an id already registered...)."""
        spec = parse(HookSpec, None, layer_name=layer_name, component=component, hook_id=hook_id,
                     capture_input=capture_input, capture_output=capture_output)
        targets = resolve_hook(self.lm, spec)
        spec = spec.model_copy(update={"hook_id": targets[0].hook_id})
        with self._lock:
            if any(h.hook_id == spec.hook_id for h in self._hooks):
                raise InvalidArgument(f"hook_id {spec.hook_id!r} is already registered; unregister it first or give "
                                      "this hook another hook_id", "hook_id")
            self._hooks = (*self._hooks, spec)
        return spec.hook_id

    def unregister_activation_hook(self, hook_id: str) -> None:
        with self._lock:
            kept = tuple(h for h in self._hooks if h.hook_id != hook_id)
            if len(kept) == len(self._hooks):
                known = ", ".join(repr(h.hook_id) for h in self._hooks) or "none"
                raise InvalidArgument(f"no registered hook {hook_id!r}; registered: {known}", "hook_id")
            self._hooks = kept

    def clear_activation_hooks(self) -> int:
        """Unregister every hook; returns how many there were."""
        with self._lock:
            n, self._hooks = len(self._hooks), ()
        return n

    def hook_points(self) -> list[dict]:
        """Every tensor this model can capture: TransformerLens name, aliases, module path,
        layer, component, direction and shape per token (engine.hooks.hook_points)."""
        return hook_points(self.lm)

    # --- attribution patching -------------------------------------------------------------
    def plan_attribution(self, *, clean: dict, corrupted: dict, metric: Any,
                         sites: Iterable[HookSpec | dict] | None = None, method: str = "atp",
                         verify_top: int | None = None) -> AttributionPlan:
        """Check and tokenize an attribution request (engine.attribution.plan_attribution); no MLX work."""
        return plan_attribution(self.lm, clean=clean, corrupted=corrupted, metric=metric, sites=sites, method=method,
                                verify_top=verify_top)

    def run_attribution(self, plan: AttributionPlan, deadline: float | None = None) -> dict:
        """Run a planned attribution (the MLX thread): clean/corrupted metrics, estimates, verified patches.
        Verifying patches not started by `deadline` (time.monotonic()) are skipped (`patched`: None)."""
        if plan.lm is not self.lm:
            raise InvalidArgument("this plan was made for another model; plan it again on this one", "plan")
        return run_attribution(plan, deadline)

    def attribute(self, *, clean: dict, corrupted: dict, metric: Any, sites: Iterable[HookSpec | dict] | None = None,
                  method: str = "atp", verify_top: int | None = None) -> dict:
        """Attribution patching (docs/attribution.md): `clean`/`corrupted` are {"messages": [...]} or
        {"prompt": text or token ids} of equal token counts; `metric` {"type": "logit_diff", "token_ids":
        [a, b]} or {"type": "logprob", "token_id": a}; `sites` hook specs (default: every layer's
        attention, mlp and residual output). -> {clean_metric, corrupted_metric, attributions, verified?}."""
        return self.run_attribution(self.plan_attribution(clean=clean, corrupted=corrupted, metric=metric, sites=sites,
                                                          method=method, verify_top=verify_top))

    # --- logit lens -------------------------------------------------------------------------
    def logit_lens(self, residuals: Any, top_k: int = 5):
        """Residuals [layers, positions, d_model] (numpy or MLX) read through the final norm and the
        unembedding (engine.lens) -> (token ids [L, T, k], probabilities [L, T, k]). The MLX thread."""
        from engine.lens import logit_lens

        return logit_lens(self.lm, residuals, top_k)

    # --- generation -------------------------------------------------------------------------
    def plan(self, *, messages: list[dict] | None = None, prompt: str | list[int] | None = None,
             sampling: SamplingParams | None = None, hooks: Iterable[HookSpec | dict] | None = None,
             capture: CaptureOptions | None = None, capture_budget_bytes: int | None = None,
             logprobs: LogprobOptions | None = None, interventions: Iterable[InterventionSpec | dict] | None = None,
             sources: Sources | None = None) -> GenerationPlan:
        """Resolve and check a request (engine.plan.plan); `hooks=None` captures nothing.
        Interventions take `vector_id`s from `self.vectors` and patch sources from `sources`
        (e.g. `engine.interventions.sources_from(earlier_completion.capture)`)."""
        return plan(self.lm, messages=messages, prompt=prompt, sampling=sampling, hooks=hooks, capture=capture,
                    capture_budget_bytes=capture_budget_bytes, logprobs=logprobs, interventions=interventions,
                    vectors=self.vectors, sources=sources)

    def run(self, plan: GenerationPlan, deadline: float | None = None) -> Iterator[TokenEvent]:
        """Generate a plan: one TokenEvent per token, the last one with `result`. Closing the
        iterator early stops the generation and removes the capture. Past `deadline`
        (time.monotonic()) it finishes early with finish_reason "length"."""
        if plan.lm is not self.lm:
            raise InvalidArgument("this plan was made for another model; plan it again on this one", "plan")
        return generate(plan, deadline)

    def stream(self, messages: list[dict] | None = None, prompt: str | list[int] | None = None,
               hooks: Iterable[HookSpec | dict] | None = REGISTERED, positions: str = "all", dtype: str = "float32",
               *, logprobs: bool = False, top_logprobs: int = 0, logprob_token_ids: Iterable[int] = (),
               interventions: Iterable[InterventionSpec | dict] | None = None, sources: Sources | None = None,
               **sampling: Any) -> Iterator[TokenEvent]:
        """Plan (checked now, before the first token) and run; sampling keyword arguments are
        SamplingParams' (max_tokens, temperature, top_p, top_k, seed, stop). `logprobs`,
        `top_logprobs` (at most 20) and `logprob_token_ids` (at most 64 ids, reported at every
        step) are LogprobOptions': each event's `logprob`. `interventions` (InterventionSpecs or
        dicts) change tensors on every step; patches copy from `sources`
        (`engine.interventions.sources_from(earlier.capture)`)."""
        return self.run(self._plan_kwargs(messages, prompt, hooks, positions, dtype, logprobs=logprobs,
                                          top_logprobs=top_logprobs, logprob_token_ids=logprob_token_ids,
                                          interventions=interventions, sources=sources, **sampling))

    def generate_many(self, requests: Iterable[dict], max_batch_size: int = 16) -> list[Completion]:
        """Many requests decoding together (continuous batching, engine/batch.py): each dict
        holds `generate`'s keyword arguments; all are planned (checked) first. Completions in
        request order, each what `generate` gives that request alone. A model that cannot
        batch (`engine.batch.batchable`) generates them one by one."""
        plans = [self._plan_kwargs(**r) for r in requests]
        if not batchable(self.lm):
            return [self._last(self.run(p)).result for p in plans]
        results: dict[int, Completion] = {}
        errors: list[BaseException] = []
        batch, waiting = Batch(self.lm), list(enumerate(plans))[::-1]

        def done(i: int, result: Completion | None, error: BaseException | None) -> None:
            results[i] = result
            if error is not None:
                errors.append(error)

        while waiting or len(batch):
            joining: list[tuple[int, GenerationPlan]] = []
            while waiting and len(batch) + len(joining) < max_batch_size and \
                    can_join([len(p.prompt) for _, p in joining], len(waiting[-1][1].prompt)):
                joining.append(waiting.pop())
            batch.join([(plan, lambda event: None, lambda r, e, i=i: done(i, r, e), lambda: bool(errors), None)
                        for i, plan in joining])
            if errors:
                raise errors[0]
            batch.step()
        return [results[i] for i in range(len(plans))]

    def _plan_kwargs(self, messages: list[dict] | None = None, prompt: str | list[int] | None = None,
                     hooks: Iterable[HookSpec | dict] | None = REGISTERED, positions: str = "all",
                     dtype: str = "float32", *, logprobs: bool = False, top_logprobs: int = 0,
                     logprob_token_ids: Iterable[int] = (), interventions: Iterable[InterventionSpec | dict] | None = None,
                     sources: Sources | None = None, **sampling: Any) -> GenerationPlan:
        options = self._logprob_options(logprobs, top_logprobs, logprob_token_ids)
        return self._plan(messages, prompt, hooks, positions, dtype, sampling, options, interventions, sources)

    @staticmethod
    def _last(events: Iterator[TokenEvent]) -> TokenEvent:
        event = None
        for event in events:
            pass
        return event

    def generate(self, *args: Any, **kwargs: Any) -> Completion:
        """`stream` (same arguments) to the end: the Completion (text, token ids, finish reason,
        activations, log-probabilities, and `interventions`: each one's positions touched per step)."""
        return self._last(self.stream(*args, **kwargs)).result

    @staticmethod
    def _logprob_options(logprobs, top_logprobs, logprob_token_ids) -> LogprobOptions:
        """Errors name LogprobOptions' fields under `logprobs` (`logprobs.token_ids[3]`), as plan's do."""
        token_ids = list(logprob_token_ids) if isinstance(logprob_token_ids, Iterable) else logprob_token_ids
        return parse(LogprobOptions, "logprobs", logprobs=logprobs, top_logprobs=top_logprobs, token_ids=token_ids)

    def _plan(self, messages, prompt, hooks, positions, dtype, sampling: dict, logprobs: LogprobOptions | None = None,
              interventions=None, sources: Sources | None = None) -> GenerationPlan:
        params = parse(SamplingParams, None, **sampling)
        options = parse(CaptureOptions, None, positions=positions, dtype=dtype)
        if hooks is REGISTERED:
            hooks = self._hooks  # a snapshot: the tuple is replaced, never changed
        return self.plan(messages=messages, prompt=prompt, sampling=params, hooks=hooks, capture=options,
                         logprobs=logprobs, interventions=interventions, sources=sources)
