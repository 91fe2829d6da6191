"""Continuous batching: many requests decoding together, each captured and intervened on alone.

As in mlx-lm's `BatchGenerator`, requests join and leave a running batch at step boundaries,
and the batch's KV caches are mlx-lm's `BatchKVCache` (left padding, `extend` to join,
`filter` to leave). What is ours is that every request keeps its own hooks, interventions,
positions, sampler, stop strings and log-probabilities:

- a request joins by running its prompt alone (its own `Forward`, its capture installed as
  for a lone run: no padding anywhere in a prompt's activations), then its cache is merged
  into the batch's;
- every decode step feeds one token per request through the model once, with a
  `BatchCapture` that hands each request's capture only its own row (its keys and attention
  columns without the batch's padding);
- each request's tokens go through its own `Generation` (engine/generate.py), the same
  bookkeeping a lone run uses, so events, finish reasons and the Completion are identical.

The batch runs on one thread (the MLX one); it knows nothing of HTTP or queues.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import engine  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from engine.capture import BatchCapture
from engine.generate import Completion, Generation, TokenEvent
from engine.model import LoadedModel
from engine.plan import GenerationPlan


def batchable(lm: LoadedModel) -> bool:
    """Whether the model decodes exactly in a batch. Its cache must be plain keys and values in
    every layer (what BatchKVCache batches; sliding-window, recurrent and other caches run one
    request at a time), and its code must take the batch's per-row offsets: some model files
    use the offset as one number (gemma2's, gpt_bigcode's positions). That is checked by
    running it: two prompts of different lengths decoded together must give the logits each
    gives alone."""
    model = lm.model
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        return False
    prompts, token = [[1, 2, 3], [4]], mx.array([[5]])
    try:
        alone, caches = [], []
        for p in prompts:
            for keep in (False, True):
                cache = make_prompt_cache(model)
                model(mx.array(p)[None], cache=cache)
                if keep:
                    caches.append(cache)
                else:
                    alone.append(model(token, cache=cache)[0, -1])
        merged = [BatchKVCache.merge([c[layer] for c in caches]) for layer in range(len(caches[0]))]
        together = model(mx.concatenate([token, token]), cache=merged)[:, -1]
        want = mx.stack(alone).astype(mx.float32)
        err = mx.abs(together.astype(mx.float32) - want).max() / mx.maximum(mx.abs(want).max(), 1e-6)
        return err.item() < 1e-3
    except Exception:  # e.g. an offset used as a Python number
        return False


@dataclass
class Row:
    """One request in the batch: its generation, and what to tell its owner."""

    gen: Generation
    on_event: Callable[[TokenEvent], None]  # every event, the last one carrying the Completion
    on_done: Callable[[Completion | None, BaseException | None], None]  # once: result (None: stopped), error
    is_cancelled: Callable[[], bool]
    token: int | None = None  # the last sampled token: this row's input at the next step


class Batch:
    """The requests decoding together on one model."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.rows: list[Row] = []
        self._cache: list[BatchKVCache] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, plan: GenerationPlan, on_event, on_done, is_cancelled, deadline: float | None = None) -> None:
        """Run the plan's prompt alone, then keep it in the batch for its next steps. A request
        that fails here (or finishes at once) leaves the batch as it was."""
        try:
            gen = Generation(plan, deadline)
            row = Row(gen, on_event, on_done, is_cancelled)
            with gen.capture.installed(self.lm) if gen.capture is not None else nullcontext():
                row.token = gen.forward(gen.prompt)
            self._after_step(row, row.token)
        except Exception as exc:  # this request's own error: the batch goes on
            on_done(None, exc)
            return
        if row.gen.finish is not None and not row.gen.needs_final_step:
            self._finish(row)
            return
        merged = [BatchKVCache.merge([c]) for c in gen.forward.cache]
        if self._cache is None:
            self._cache = merged
        else:
            for batch_cache, new in zip(self._cache, merged):
                batch_cache.extend(new)
        self.rows.append(row)

    def step(self) -> None:
        """One forward step for every request: each gets its next token (or, once finished with
        hooks, its last token's own activations) and its event. Requests that finished, were
        cancelled or failed leave the batch."""
        self._leave([r for r in self.rows if r.is_cancelled()], cancelled=True)
        if not self.rows:
            return
        rows = self.rows
        length = self._cache[0]._idx + 1  # keys per row after this step, padding included
        captured = []
        for i, r in enumerate(rows):
            c = r.gen.capture
            if c is not None:
                c.begin_step(r.gen.forward.step, r.gen.forward.position)
                captured.append((i, c))
        pads = [length - (r.gen.forward.position + 1) for r in rows]
        try:
            with BatchCapture(captured, pads).installed() if captured else nullcontext():
                out = self.lm.model(mx.array([[r.token] for r in rows]), cache=self._cache)
            pending, drawn = [], []
            for i, r in enumerate(rows):
                if r.gen.capture is not None:
                    pending.extend(r.gen.capture.end_step())
                drawn.append(None if r.gen.finish is not None else r.gen.forward.draw(out[i:i + 1, -1, :], pending))
            mx.eval(*pending)
        except Exception as exc:  # the step is lost for every row: they all end with the error
            failed, self.rows, self._cache = self.rows, [], None
            for r in failed:
                r.on_done(None, exc)
            return
        finished, failed = [], []
        for r, token in zip(rows, drawn):
            final = r.gen.finish is not None  # this was its last token's own step
            r.token = r.gen.forward.advance(1, token)
            if final:
                finished.append(r)
                continue
            try:
                self._after_step(r, r.token)
            except Exception as exc:  # its owner's callback failed: it leaves with that error
                failed.append((r, exc))
                continue
            if r.gen.finish is not None and not r.gen.needs_final_step:
                finished.append(r)
        self._leave([r for r, _ in failed], cancelled=True, errors=[e for _, e in failed])
        self._leave(finished, cancelled=False)

    def cancel_all(self, exc: BaseException) -> None:
        """End every request with `exc` (the server is shutting down)."""
        rows, self.rows, self._cache = self.rows, [], None
        for r in rows:
            r.on_done(None, exc)

    def _after_step(self, row: Row, token: int) -> None:
        event = row.gen.accept(token)
        if event is not None:
            row.on_event(event)

    def _finish(self, row: Row) -> None:
        try:
            event = row.gen.final_event()
            row.on_event(event)
        except Exception as exc:  # e.g. its owner's callback failed
            row.on_done(None, exc)
            return
        row.on_done(event.result, None)

    def _leave(self, leaving: list[Row], cancelled: bool, errors: list[BaseException] | None = None) -> None:
        """Take rows out of the batch; they end cancelled (with `errors`, one per row, if given)
        or finished (their last event and Completion)."""
        if not leaving:
            return
        gone = {id(r) for r in leaving}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if self.rows:
            for c in self._cache:
                c.filter(mx.array(keep))
        else:
            self._cache = None
        for i, r in enumerate(leaving):
            if cancelled:
                r.on_done(None, errors[i] if errors else None)
            else:
                self._finish(r)
