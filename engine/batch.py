"""Continuous batching: many requests decoding together, each captured and intervened on alone.

As in mlx-lm's `BatchGenerator`, requests join and leave a running batch at step boundaries,
and the batch's KV caches are mlx-lm's `BatchKVCache` (left padding, `extend` to join,
`filter` to leave). What is ours is that every request keeps its own hooks, interventions,
positions, sampler, stop strings and log-probabilities:

- requests admitted together run their prompts in one right-padded forward (`join`): a
  causal model never lets a prompt token see the padding after it, and the cache then turns
  the right padding into the left padding decoding uses; their caches join the batch's;
- every decode step feeds one token per request through the model once;
- in both, a `BatchCapture` hands each request's capture only its own row (its real tokens,
  its keys and attention columns without the batch's padding), and its interventions change
  only that row;
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


# Prompts that join a batch together run in one forward of at most this many prompts and padded
# tokens (a longer prompt runs alone): mlx-lm's BatchGenerator prefills 8 prompts at a time too.
JOIN_ROWS, JOIN_TOKENS = 8, 4096


def can_join(joining: list[int], length: int) -> bool:
    """Whether a prompt of `length` tokens may run in one forward with prompts of the `joining`
    lengths (the first always may)."""
    return not joining or (len(joining) < JOIN_ROWS and max(*joining, length) * (len(joining) + 1) <= JOIN_TOKENS)


def batchable(lm: LoadedModel) -> bool:
    """Whether the model runs exactly in a batch. Its cache must be plain keys and values in
    every layer (what BatchKVCache batches; sliding-window, recurrent and other caches run one
    request at a time), and its code must take the batch's per-row offsets: some model files
    use the offset as one number (gemma2's, gpt_bigcode's positions). That is checked by
    running it as a batch runs: two prompts of different lengths through one right-padded
    forward, then one decoding step together, must give the logits each gives alone."""
    model = lm.model
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        return False
    prompts, token = [[1, 2, 3], [4]], mx.array([[5]])
    try:
        alone = []
        for p in prompts:
            cache = make_prompt_cache(model)
            first = model(mx.array(p)[None], cache=cache)[0, -1]
            alone.append(mx.stack([first, model(token, cache=cache)[0, -1]]))
        cache = [BatchKVCache([0, 0]) for _ in range(len(make_prompt_cache(model)))]
        for c in cache:
            c.prepare(right_padding=[0, 2])
        out = model(mx.array([[1, 2, 3], [4, 0, 0]]), cache=cache)
        for c in cache:
            c.finalize()
        firsts = [out[0, 2], out[1, 0]]
        seconds = model(mx.concatenate([token, token]), cache=cache)[:, -1]
        together = mx.stack([mx.stack([firsts[i], seconds[i]]) for i in range(2)]).astype(mx.float32)
        want = mx.stack(alone).astype(mx.float32)
        err = mx.abs(together - want).max() / mx.maximum(mx.abs(want).max(), 1e-6)
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
        self._n_layers = len(make_prompt_cache(lm.model))

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, plan: GenerationPlan, on_event, on_done, is_cancelled, deadline: float | None = None) -> None:
        """`join` one request."""
        self.join([(plan, on_event, on_done, is_cancelled, deadline)])

    def join(self, requests: list[tuple]) -> None:
        """Run the requests' prompts together, then keep them in the batch for their next steps.
        Each request is (plan, on_event, on_done, is_cancelled, deadline). The prompts are
        right-padded into one forward: causal attention never lets a real token see the padding
        after it, so no activation of a prompt token depends on its neighbours; the cache then
        turns the right padding into the left padding decoding uses (mlx-lm's `finalize`). A
        request that fails here (or finishes at once) leaves the batch as it was."""
        rows = []
        for plan, on_event, on_done, is_cancelled, deadline in requests:
            try:
                rows.append(Row(Generation(plan, deadline), on_event, on_done, is_cancelled))
            except Exception as exc:  # this request's own error
                on_done(None, exc)
        if not rows:
            return
        lengths = [len(r.gen.prompt) for r in rows]
        width = max(lengths)
        cache = [BatchKVCache([0] * len(rows)) for _ in range(self._n_layers)]
        for c in cache:
            c.prepare(right_padding=[width - n for n in lengths])
        captured = []
        for i, r in enumerate(rows):
            if r.gen.capture is not None:
                r.gen.capture.begin_step(0, 0)
                captured.append((i, r.gen.capture))
        try:
            with BatchCapture(captured, lengths, [slice(0, n) for n in lengths]).installed() \
                    if captured else nullcontext():
                out = self.lm.model(mx.array([r.gen.prompt + [0] * (width - n) for r, n in zip(rows, lengths)]),
                                    cache=cache)
            pending, drawn = [], []
            for i, r in enumerate(rows):
                if r.gen.capture is not None:
                    pending.extend(r.gen.capture.end_step())
                drawn.append(r.gen.forward.draw(out[i:i + 1, lengths[i] - 1, :], pending))
            for c in cache:
                c.finalize()
            mx.eval(*pending)
        except Exception as exc:  # these requests end with the error; the batch goes on
            for r in rows:
                r.on_done(None, exc)
            return
        staying = []
        for i, r in enumerate(rows):
            r.token = r.gen.forward.advance(lengths[i], drawn[i])
            try:
                self._after_step(r, r.token)
            except Exception as exc:  # its owner's callback failed
                r.on_done(None, exc)
                continue
            if r.gen.finish is not None and not r.gen.needs_final_step:
                self._finish(r)
            else:
                staying.append(i)
        if not staying:
            return
        if len(staying) < len(rows):
            for c in cache:
                c.filter(mx.array(staying))
        if self._cache is None:
            self._cache = cache
        else:
            for batch_cache, new in zip(self._cache, cache):
                batch_cache.extend(new)
        self.rows.extend(rows[i] for i in staying)

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
        keys = [slice(length - (r.gen.forward.position + 1), length) for r in rows]  # after the left padding
        try:
            with BatchCapture(captured, [1] * len(rows), keys).installed() if captured else nullcontext():
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
