"""The Python client's `attribution` against a real server (the suite's `nsbridge serve` on loopback) with the
tiny random llama: the Arrow and JSON answers decode to the same result, which is what the engine computes
in this process for the same request; the result's arrays and matrix(); errors raise with the field."""

from __future__ import annotations

import numpy as np
import pytest

from bridge import AttributionResult, LMStudioNeuroScopeClient, NeuroScopeServerError
from engine.api import Model

CLEAN = "John gave Mary the book because she"
CORRUPTED = "Mary gave John the book because she"
SITES = ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.2.hook_attn_out", "blocks.1.attn.hook_z",
         "blocks.2.attn.hook_q"]


@pytest.fixture(scope="module")
def client(tiny_server):  # attribution keeps nothing on the server: the shared one serves
    c = LMStudioNeuroScopeClient(tiny_server.base_url)
    yield c
    c.close()


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_client_attribution_matches_the_engine(client, tiny_llama, method):
    a, b = tiny_llama.text_prompt("Mary")[0], tiny_llama.text_prompt("John")[0]
    r = client.attribution(CLEAN, CORRUPTED, (a, b), sites=SITES, method=method, verify_top=4)
    assert isinstance(r, AttributionResult) and r.method == method and r.model == "tiny-llama"
    want = Model(tiny_llama).attribute(clean={"prompt": CLEAN}, corrupted={"prompt": CORRUPTED},
                                       metric={"type": "logit_diff", "token_ids": [a, b]},
                                       sites=[{"layer_name": x} for x in SITES], method=method, verify_top=4)
    assert r.rows() == want["attributions"]
    assert r.verified == want["verified"]
    assert r.clean_metric == want["clean_metric"] and r.corrupted_metric == want["corrupted_metric"]
    assert r.n_tokens == want["n_tokens"] and r.clean_tokens == want["clean_tokens"]
    assert r.metric == {"type": "logit_diff", "token_ids": [a, b]}
    # JSON gives the same result as Arrow.
    j = client.attribution(CLEAN, CORRUPTED, (a, b), sites=SITES, method=method, verify_top=4, arrow=False)
    assert j.rows() == r.rows() and j.verified == r.verified
    for name in ("position", "head", "estimate"):
        np.testing.assert_array_equal(getattr(j, name), getattr(r, name))
    assert (r.graddrop is not None) == (method == "atp*")
    # numpy-friendly: arrays, a site x position matrix, heads on a last axis
    assert r.estimate.dtype == np.float64 and r.position.dtype == np.int64 and len(r) == len(want["attributions"])
    assert r.sites == SITES
    names, grid = r.matrix("attention")
    assert names == SITES[:3] and grid.shape == (3, r.n_tokens)
    rows = [x for x in want["attributions"] if x["layer_name"] == "blocks.1.hook_attn_out"]
    np.testing.assert_array_equal(grid[1], [x["estimate"] for x in rows])
    names, heads = r.matrix("head_output")
    assert names == ["blocks.1.attn.hook_z"] and heads.shape == (1, r.n_tokens, 4)
    assert heads[0, 3, 2] == next(x["estimate"] for x in want["attributions"]
                                  if x["layer_name"] == "blocks.1.attn.hook_z" and x["position"] == 3
                                  and x["head"] == 2)
    top = r.top(4)
    assert [{k: v for k, v in x.items() if k != "patched"} for x in r.verified] == top


def test_client_attribution_inputs_and_errors(client, tiny_llama):
    ids_clean, ids_corrupted = tiny_llama.text_prompt(CLEAN), tiny_llama.text_prompt(CORRUPTED)
    a = tiny_llama.text_prompt("Mary")[0]
    # token ids, a logprob metric, the default sites (every layer's attention, mlp and residual output)
    r = client.attribution(ids_clean, np.array(ids_corrupted), a)
    assert r.metric == {"type": "logprob", "token_id": a}
    hooks = ("hook_attn_out", "hook_mlp_out", "hook_resid_post")
    assert r.sites == [f"blocks.{i}.{h}" for i in range(3) for h in hooks]
    assert r.verified == [] and np.all(r.head == -1)
    # a chat goes through the chat template
    chat = client.attribution([{"role": "user", "content": CLEAN}], [{"role": "user", "content": CORRUPTED}],
                              {"type": "logprob", "token_id": a}, sites="blocks.2.hook_resid_post")
    assert chat.n_tokens > len(ids_clean) and chat.sites == ["blocks.2.hook_resid_post"]
    with pytest.raises(NeuroScopeServerError) as info:
        client.attribution(CLEAN, "Mary gave John", (a, 5))
    assert info.value.status == 400 and info.value.param == "corrupted" and "tokens" in str(info.value)
    with pytest.raises(NeuroScopeServerError) as info:
        client.attribution(CLEAN, CORRUPTED, (a, 5), sites=["blocks.9.hook_mlp_out"])
    assert info.value.status == 400 and info.value.param == "sites[0].layer_name"
    with pytest.raises(TypeError, match="metric"):
        client.attribution(CLEAN, CORRUPTED, "Mary")
