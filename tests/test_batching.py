"""Continuous batching (engine/batch.py): a request in a batch equals the same request run alone.

Requests of different prompt lengths join a running batch mid-generation and leave when they
finish. Each is compared with the same plan run alone (`engine.generate`): greedy tokens
identical, every captured tensor of every step equal within TOL relative to the tensor's largest
magnitude, interventions' reports identical. Batched decoding feeds one token per request through
the same weights; the only numerical difference is that matrix products run over B rows instead of
one (a different BLAS blocking), and attention runs with the batch's padding mask. On the tiny
models that is bit-exact; on SmolLM2 the largest difference we find is about 2e-6 relative
(float32 rounding in a different summation order), hence TOL.
"""

from __future__ import annotations

import gc
import threading
import time

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest

from engine.api import Model
from engine.batch import Batch, batchable
from engine.params import CaptureOptions, SamplingParams

TOL = 1e-5
PROMPTS = [
    "Hello there, how are you doing today?",
    "Hi",
    "The quick brown fox jumps over the lazy dog and then some more words follow it",
    "Mary and John went to the store. John gave a drink to",
]
HOOK_NAMES = ("hook_embed", "hook_resid_pre", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
              "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "mlp.hook_post",
              "hook_mlp_out", "ln1.hook_normalized")


def all_hooks(model: Model, layers=None) -> list[dict]:
    """Every capturable TransformerLens-named hook of the given layers that this model has."""
    names = {p["name"] for p in model.hook_points()}
    layers = range(model.info.n_layers) if layers is None else layers
    wanted = [f"blocks.{l}.{h}" if h != "hook_embed" else h for l in layers for h in HOOK_NAMES]
    return [{"layer_name": n} for n in dict.fromkeys(wanted) if n in names]


def plan_for(model: Model, i: int, hooks, interventions=None, **sampling):
    params = SamplingParams(**{"max_tokens": 5 + 3 * i, "temperature": 0, **sampling})
    return model.plan(prompt=PROMPTS[i % len(PROMPTS)], sampling=params, hooks=hooks, capture=CaptureOptions(),
                      interventions=interventions)


def alone(model: Model, plan):
    *_, last = model.run(plan)
    return last.result


def batched(model: Model, plans, join_after=(0, 2, 1, 3), groups=None):
    """Run the plans in one Batch: group g of plans (`groups`, default one plan each) joins
    together after `join_after[g]` more decode steps, its prompts in one right-padded forward."""
    batch = Batch(model.lm)
    results, events = {}, {k: [] for k in range(len(plans))}
    for g, members in enumerate(groups or [[k] for k in range(len(plans))]):
        for _ in range(join_after[g] if g else 0):
            if len(batch):
                batch.step()
        batch.join([(plans[k], events[k].append, lambda r, e, k=k: results.__setitem__(k, (r, e)), lambda: False,
                     None) for k in members])
    while len(batch):
        batch.step()
    assert sorted(results) == list(range(len(plans)))
    for k, (result, error) in results.items():
        assert error is None, error
        assert events[k][-1].result is result
    return [results[k][0] for k in range(len(plans))], events


def assert_same(got, want, tol=TOL) -> float:
    """Same tokens, text, finish, interventions report; every tensor close. Returns the worst
    difference relative to each tensor's largest magnitude."""
    assert got.token_ids == want.token_ids
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert got.interventions == want.interventions
    assert set(got.activations) == set(want.activations)
    worst = 0.0
    for key, w in want.activations.items():
        g = got.activations[key]
        assert g.shape == w.shape, key
        finite = np.isfinite(w)
        assert np.array_equal(finite, np.isfinite(g)), f"{key}: masked entries differ"
        if finite.any():
            scale = max(float(np.abs(w[finite]).max()), 1e-6)
            err = float(np.abs(g[finite] - w[finite]).max()) / scale
            assert err <= tol, f"{key}: {err:.2e} relative"
            worst = max(worst, err)
    if want.capture is not None:
        assert [(h.hook_id, [s.step for s in h.steps]) for h in got.capture.hooks] == \
               [(h.hook_id, [s.step for s in h.steps]) for h in want.capture.hooks]
    return worst


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen3"])
def tiny(request):
    return Model(request.getfixturevalue(f"tiny_{request.param}"))


def test_batch_equals_alone_with_every_component(tiny):
    assert batchable(tiny.lm)
    hooks = all_hooks(tiny)
    plans = [plan_for(tiny, i, hooks) for i in range(4)]
    got, _ = batched(tiny, plans)
    for g, plan in zip(got, plans):
        assert_same(g, alone(tiny, plan))


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3]], [[1, 3], [0, 2]], [[2], [0, 1, 3]]])
def test_prompts_joining_together_equal_alone(tiny, groups):
    """Prompts of different lengths run in one right-padded forward (every component, and
    interventions on the prompt: key/value edits written to the right places of the cache)."""
    edits = [None, [{"layer_name": "blocks.1.attn.hook_k", "op": "scale", "coefficient": 2.0, "positions": [0, 2]}],
             [{"layer_name": "blocks.0.hook_resid_post", "op": "add", "coefficient": 3.0,
               "vector": [0.5] * tiny.info.d_model, "positions": "prompt"}],
             [{"layer_name": "blocks.2.attn.hook_v", "op": "zero", "heads": [1]}]]
    hooks = all_hooks(tiny)
    plans = [plan_for(tiny, i, hooks, interventions=edits[i]) for i in range(4)]
    got, _ = batched(tiny, plans, join_after=(0, 2, 1), groups=groups)
    for g, plan in zip(got, plans):
        assert_same(g, alone(tiny, plan))


def test_events_match_alone(tiny):
    """Streamed events (text deltas, steps, logprobs) are those of a lone run."""
    plans = [tiny.plan(prompt=PROMPTS[i], sampling=SamplingParams(max_tokens=6, temperature=0, stop=["e"]),
                       logprobs=__import__("engine.params", fromlist=["LogprobOptions"]).LogprobOptions(
                           logprobs=True, top_logprobs=3))
             for i in range(3)]
    _, events = batched(tiny, plans)
    for k, plan in enumerate(plans):
        want = list(tiny.run(plan))
        got = events[k]
        assert [(e.index, e.token, e.text, e.step, e.finish_reason) for e in got] == \
               [(e.index, e.token, e.text, e.step, e.finish_reason) for e in want]
        for g, w in zip(got, want):
            assert g.logprob.token == w.logprob.token
            assert [t for t, _ in g.logprob.top] == [t for t, _ in w.logprob.top]
            assert abs(g.logprob.logprob - w.logprob.logprob) < 1e-5


def test_interventions_stay_in_their_row(tiny):
    """Every kind of site edited in one request; its neighbours equal their lone runs, and the
    edited request equals its own lone run (key/value edits written to its cache row only)."""
    edits = [
        [{"layer_name": "blocks.0.hook_resid_post", "op": "scale", "coefficient": 0.0}],
        [{"layer_name": "blocks.1.attn.hook_v", "op": "scale", "coefficient": 3.0, "positions": "generated"},
         {"layer_name": "blocks.0.attn.hook_k", "op": "zero", "heads": [0]}],
        [{"layer_name": "blocks.1.attn.hook_z", "op": "zero", "heads": [1]},
         {"layer_name": "blocks.0.mlp.hook_post", "op": "scale", "coefficient": -2.0, "indices": [0, 1, 2]}],
        None,
    ]
    hooks = all_hooks(tiny, layers=[0, 1])
    plans = [plan_for(tiny, i, hooks, interventions=e) for i, e in enumerate(edits)]
    got, _ = batched(tiny, plans)
    plain = [alone(tiny, plan_for(tiny, i, hooks)) for i in range(4)]
    for i, (g, plan) in enumerate(zip(got, plans)):
        assert_same(g, alone(tiny, plan))
    # The edits did change their own requests (else the test above proves nothing).
    for i in range(3):
        assert any(not np.allclose(got[i].activations[k], plain[i].activations[k], equal_nan=True)
                   for k in plain[i].activations if k.startswith("blocks.1"))
    assert_same(got[3], plain[3])


def test_seeded_sampling_is_the_same_in_a_batch(tiny):
    plans = [plan_for(tiny, i, None, temperature=1.0, seed=100 + i, max_tokens=12) for i in range(3)]
    got, _ = batched(tiny, plans)
    for g, plan in zip(got, plans):
        assert g.token_ids == alone(tiny, plan).token_ids


def test_positions_options_and_deadline(tiny_llama):
    model = Model(tiny_llama)
    hooks = all_hooks(model, layers=[1])
    plans = [model.plan(prompt=PROMPTS[i], sampling=SamplingParams(max_tokens=7, temperature=0), hooks=hooks,
                        capture=CaptureOptions(positions=pos))
             for i, pos in enumerate(("last", "prompt", "generated"))]
    got, _ = batched(model, plans)
    for g, plan in zip(got, plans):
        assert_same(g, alone(model, plan))


def test_a_failing_request_leaves_the_batch_going(tiny_llama):
    """A request that fails while it joins (here: its event callback raises) ends with its
    error; the batch and the others go on."""
    model = Model(tiny_llama)
    good = [plan_for(model, i, all_hooks(model, layers=[0])) for i in range(2)]
    batch = Batch(model.lm)
    out = {}
    batch.add(good[0], lambda e: None, lambda r, e: out.__setitem__(0, (r, e)), lambda: False)
    def fail(event):
        raise RuntimeError("client callback failed")

    batch.add(plan_for(model, 2, None), fail, lambda r, e: out.__setitem__(2, (r, e)), lambda: False)
    batch.add(good[1], lambda e: None, lambda r, e: out.__setitem__(1, (r, e)), lambda: False)
    while len(batch):
        batch.step()
    assert out[2][0] is None and out[2][1] is not None
    for i in (0, 1):
        assert out[i][1] is None
        assert_same(out[i][0], alone(model, good[i]))


def test_cancelled_request_leaves_at_the_next_step(tiny_llama):
    model = Model(tiny_llama)
    plans = [plan_for(model, i, all_hooks(model, layers=[0]), max_tokens=30) for i in range(3)]
    batch = Batch(model.lm)
    out, stop = {}, threading.Event()
    for k, plan in enumerate(plans):
        cancelled = stop.is_set if k == 1 else (lambda: False)
        batch.add(plan, lambda e: None, lambda r, e, k=k: out.__setitem__(k, (r, e)), cancelled)
    batch.step()
    stop.set()
    batch.step()
    assert out[1] == (None, None) and len(batch) == 2
    while len(batch):
        batch.step()
    for k in (0, 2):
        assert_same(out[k][0], alone(model, plans[k]))


# --- every batchable architecture of the zoo --------------------------------------------------
_WINDOW = "a sliding-window cache"
NOT_BATCHED = {  # and why
    "gemma2": "its code takes the cache offset as one number", "gpt_bigcode": "its code takes the cache offset as one number",
    "olmo3": _WINDOW, "cohere2": _WINDOW, "exaone4": _WINDOW, "gemma3_text": _WINDOW, "gemma4_text": _WINDOW,
    "gpt_oss": _WINDOW, "afmoe": _WINDOW, "exaone_moe": _WINDOW, "mellum": _WINDOW, "laguna": _WINDOW,
    "longcat_flash": "a CacheList cache", "deepseek_v32": "a CacheList cache", "glm_moe_dsa": "a CacheList cache",
}

def _zoo_names():
    from tests.arch_zoo import ZOO
    from tests.test_arch_zoo import _params

    return _params(list(ZOO))


@pytest.mark.parametrize("model_type", _zoo_names())
def test_zoo_batch_equals_alone(model_type):
    """Models whose cache batches decode together exactly; the others run one at a time (the
    service never batches them), which is what `batchable` says."""
    from engine.model import load_model
    from tests.test_arch_zoo import zoo_model

    model = Model(load_model(str(zoo_model(model_type)), model_type))
    if not batchable(model.lm):
        assert model_type in NOT_BATCHED, f"{model_type} no longer batches"
        pytest.skip(f"{model_type} does not batch ({NOT_BATCHED[model_type]}): its requests run one at a time")
    assert model_type not in NOT_BATCHED, f"{model_type} batches now: take it off NOT_BATCHED"
    hooks = all_hooks(model)
    plans = [plan_for(model, i, hooks, max_tokens=4) for i in range(3)]
    got, _ = batched(model, plans, join_after=(0, 1), groups=[[0, 2], [1]])
    for g, plan in zip(got, plans):
        assert_same(g, alone(model, plan), tol=1e-4)


@pytest.mark.slow
def test_default_model_batch_equals_alone(default_model):
    """SmolLM2-135M: four requests of different lengths joining mid-generation, every component
    of three layers and interventions in two of them."""
    model = Model(default_model)
    hooks = all_hooks(model, layers=[0, 14, 29])
    edits = [None, [{"layer_name": "blocks.14.attn.hook_v", "op": "scale", "coefficient": 2.0}], None,
             [{"layer_name": "blocks.3.hook_resid_post", "op": "add", "coefficient": 4.0,
               "vector": [0.1] * model.info.d_model}]]
    plans = [plan_for(model, i, hooks, interventions=edits[i], max_tokens=8) for i in range(4)]
    got, _ = batched(model, plans, join_after=(0, 2), groups=[[0, 2], [1, 3]])
    worst = max(assert_same(g, alone(model, plan)) for g, plan in zip(got, plans))
    print(f"largest relative difference batched vs alone: {worst:.2e}")


# --- the server: mixed requests at once ------------------------------------------------------
HOOKS = [{"layer_name": "blocks.0.hook_resid_post", "hook_id": "r0"},
         {"layer_name": "blocks.1.attn.hook_pattern", "hook_id": "p1"},
         {"layer_name": "blocks.2.attn.hook_v", "hook_id": "v2"}]
STEER = [{"layer_name": "blocks.1.hook_resid_post", "op": "scale", "coefficient": -1.0}]


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    from tests.conftest import ServerProcess

    s = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("batch-server"), ["--max-batch-size", "4"])
    yield s
    s.stop()


def _request(client, kind: int, content: str) -> dict:
    """One request of a given kind, reduced to what must not depend on its neighbours."""
    msgs = [{"role": "user", "content": content}]
    n = 6 + kind
    if kind == 0:
        return {"text": client.chat(msgs, max_tokens=n, temperature=0).text}
    if kind == 1:
        stream = client.chat(msgs, max_tokens=n, temperature=0, stream=True)
        return {"text": "".join(stream)}
    if kind == 2:
        r = client.generate_with_activations(msgs, HOOKS, max_tokens=n, temperature=0)
        return {"text": r.text, **{h: np.concatenate([a.ravel() for a in r.arrays(h)]) for h in ("r0", "v2")}}
    if kind == 3:
        with client.generate_with_activations(msgs, HOOKS, max_tokens=n, temperature=0, transport="shm") as cap:
            return {"text": cap.text, **{k: np.array(v) for k, v in cap.arrays.items()}}
    if kind == 4:
        stream = client.generate_with_activations(msgs, HOOKS, max_tokens=n, temperature=0, stream=True,
                                                  transport="shm")
        with stream.result() as cap:
            return {"text": cap.text, **{k: np.array(v) for k, v in cap.arrays.items()}}
    if kind == 5:
        stream = client.generate_with_activations(msgs, HOOKS, max_tokens=n, temperature=0, stream=True,
                                                  encoding="base64", interventions=STEER, baseline=True)
        r = stream.result()
        return {"text": r.text, "baseline": stream.baseline["choices"][0]["message"]["content"], "touched": stream.interventions,
                **{h: np.concatenate([a.ravel() for a in r.arrays(h)]) for h in ("r0", "v2")}}
    r = client.chat(msgs, max_tokens=n, temperature=0, logprobs=True, top_logprobs=2)
    return {"text": r.text, "logprobs": [(e["token"], round(e["logprob"], 4)) for e in r.logprobs]}


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        if isinstance(w, np.ndarray):
            finite = np.isfinite(w)
            assert np.array_equal(finite, np.isfinite(got[key])), key
            np.testing.assert_allclose(got[key][finite], w[finite], rtol=TOL, atol=TOL, err_msg=key)
        else:
            assert got[key] == w, key


def test_server_mixed_batch_equals_sequential(server):
    """Seven kinds of request (streamed or not, with and without capture, shm and inline,
    interventions with a baseline, logprobs) sent at once, while one more client leaves in the
    middle of its stream: each answer equals the same request sent alone, the requests really
    decoded together, and nothing is left on the server afterwards."""
    from bridge.client import LMStudioNeuroScopeClient
    from tests.test_server_config import RawStream

    base = server.base_url
    client = LMStudioNeuroScopeClient(base)
    contents = [f"Tell me about item {i} " + "and more " * i for i in range(7)]
    alone_results = [_request(client, k, contents[k]) for k in range(7)]

    together: dict = {}
    errors: list = []

    def run(k):
        try:
            together[k] = _request(LMStudioNeuroScopeClient(base), k, contents[k])
        except Exception as exc:  # reported below, with the others' results
            errors.append((k, exc))

    leaving = RawStream(server.port, "/v1/chat/completions/with_activations",
                        {"messages": [{"role": "user", "content": "bye"}], "max_tokens": 200, "temperature": 0,
                         "stream": True, "activation_hooks": HOOKS, "activations_transport": "shm"})

    def leave():
        leaving.read_events(4)
        leaving.close()

    seen = concurrently(base, [leave, *(lambda k=k: run(k) for k in range(7))])
    assert not errors, errors
    for k in range(7):
        _same(together[k], alone_results[k])
    assert max(seen) >= 2, f"requests never decoded together (batch sizes seen: {sorted(set(seen))})"
    assert max(seen) <= 4  # --max-batch-size
    _wait_idle(base)


def requests_get(url: str) -> dict:
    import requests

    return requests.get(url, timeout=10).json()


def concurrently(base: str, fns) -> list[int]:
    """Run the callables on threads at once; the batch sizes /health reported meanwhile."""
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(requests_get(base + "/health")["decoding"])
            time.sleep(0.005)

    threads = [threading.Thread(target=watch), *(threading.Thread(target=f) for f in fns)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(120)
    stop.set()
    threads[0].join()
    return seen


def _wait_idle(base: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health, captures = requests_get(base + "/health"), requests_get(base + "/v1/activations")
        if health["queued"] == 0 and health["decoding"] == 0 and captures["segments"] == [] \
                and captures["live_bytes"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"server not idle: {health}, {captures}")


def test_server_concurrent_soak_memory_flat(server):
    """A few hundred mixed requests from eight clients at once: the server's memory stays flat
    and no capture or segment is left."""
    import requests

    from tests.test_server_soak import one_round, rss_bytes

    base, pid = server.base_url, server.proc.pid

    def client(offset: int, rounds: int) -> None:
        session = requests.Session()
        for i in range(rounds):
            one_round(session, base, offset + i)

    def rounds(n: int) -> None:
        threads = [threading.Thread(target=client, args=(k * 7, n)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    rounds(6)  # warm-up: caches, pooled segments, batch shapes
    gc.collect()
    before = rss_bytes(pid)
    rounds(30)  # 240 requests
    after = rss_bytes(pid)
    assert after - before < 50 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB over 240 requests"
    _wait_idle(base)


def test_capture_budget_counts_across_the_batch(tiny_llama, tiny_llama_path, tmp_path_factory):
    """With a budget that holds one capture but not two, captured requests decode one after
    another."""
    from bridge.client import LMStudioNeuroScopeClient
    from tests.conftest import ServerProcess

    hooks = [{"layer_name": f"blocks.{l}.attn.hook_pattern"} for l in range(3)]
    one = Model(tiny_llama).plan(messages=[{"role": "user", "content": "Hi"}], hooks=hooks,
                                 sampling=SamplingParams(max_tokens=40, temperature=0)).capture_bytes
    s = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("budget-server"),
                      ["--capture-budget", str(int(one * 1.5)), "--max-batch-size", "8"])
    try:
        base, results = s.base_url, {}

        def run(k):
            c = LMStudioNeuroScopeClient(base)
            results[k] = c.generate_with_activations("Hi", hooks, max_tokens=40, temperature=0).text

        seen = concurrently(base, [lambda k=k: run(k) for k in range(3)])
        assert len(results) == 3 and len(set(results.values())) == 1
        assert max(seen) == 1, f"captures over the budget decoded together: {sorted(set(seen))}"
    finally:
        s.stop()


def test_a_model_that_cannot_batch_serves_one_at_a_time(tmp_path_factory):
    """gemma3_text (sliding-window layers): concurrent requests never share a batch and each
    answers what it answers alone."""
    from bridge.client import LMStudioNeuroScopeClient
    from tests.conftest import ServerProcess
    from tests.test_arch_zoo import zoo_model

    s = ServerProcess(str(zoo_model("gemma3_text")), tmp_path_factory.mktemp("window-server"))
    try:
        base, hooks = s.base_url, [{"layer_name": "blocks.0.hook_resid_post", "hook_id": "r0"}]

        def ask(k):
            r = LMStudioNeuroScopeClient(base).generate_with_activations(f"Hello {k}", hooks, max_tokens=12,
                                                                         temperature=0)
            return r.text, np.concatenate([a.ravel() for a in r.arrays("r0")])

        alone_results = [ask(k) for k in range(3)]
        together: dict = {}
        seen = concurrently(base, [lambda k=k: together.__setitem__(k, ask(k)) for k in range(3)])
        for k in range(3):
            assert together[k][0] == alone_results[k][0]
            np.testing.assert_array_equal(together[k][1], alone_results[k][1])
        assert max(seen) == 0  # never in a batch
    finally:
        s.stop()


def test_generate_many_equals_generate(tiny_llama):
    """The engine API's batched form: each request's Completion is what `generate` gives it."""
    from engine.errors import InvalidArgument

    model = Model(tiny_llama)
    requests = [{"prompt": PROMPTS[i], "max_tokens": 4 + 2 * i, "temperature": 0,
                 "hooks": all_hooks(model, layers=[i % 3])} for i in range(4)]
    requests.append({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.8,
                     "seed": 3, "hooks": None, "logprobs": True})
    many = model.generate_many(requests, max_batch_size=2)
    for got, kwargs in zip(many, requests):
        assert_same(got, model.generate(**kwargs))
    with pytest.raises(InvalidArgument):  # planned (checked) before anything runs
        model.generate_many([requests[0], {"prompt": "x", "max_tokens": 0}])


def test_a_callback_failing_mid_generation_ends_only_its_request(tiny_llama):
    model = Model(tiny_llama)
    plans = [plan_for(model, i, all_hooks(model, layers=[0]), max_tokens=8) for i in range(3)]
    batch, out = Batch(model.lm), {}

    def fail_at_third(event):
        if event.index == 2:
            raise RuntimeError("client went away")

    for k, plan in enumerate(plans):
        batch.add(plan, fail_at_third if k == 1 else (lambda e: None),
                  lambda r, e, k=k: out.__setitem__(k, (r, e)), lambda: False)
    while len(batch):
        batch.step()
    assert out[1][0] is None and isinstance(out[1][1], RuntimeError)
    for k in (0, 2):
        assert_same(out[k][0], alone(model, plans[k]))
