"""Interventions: every op on every interventable site equals Hugging Face transformers doing the same.

The reference is transformers (torch, CPU, float32) loading the SAME weights and generating
greedily WITHOUT a KV cache: each step reruns the whole sequence so far, with torch hooks that
apply the same edit at the same absolute positions (forward hooks and pre-hooks on the
embedding, decoder layers, attention, MLP, norms and the output projections, and a custom
attention function, registered through transformers' AttentionInterface, for post-RoPE
queries, keys and values). A key or value edited at position p is thus recomputed, edited, and
seen by every later token on every step: what our KV cache write-back must reproduce. Patch
sources come from a clean reference run, never from our capture.

Our side is the engine's cached token-by-token generation (prefill, then one token per step)
with the intervention, capturing every hook point; hooks in the same request see the
intervened values. We compare the generated tokens, every captured tensor at every position
(the intervened site, and everything downstream: later layers, attention patterns, the final
norm) and the positions each intervention touched at each step.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest

import vocabulary
from engine.capture import Capture
from engine.errors import InvalidArgument, UnknownHook
from engine.generate import Completion, generate
from engine.hooks import hook_points
from engine.interventions import Intervention, intervention_specs, resolve_interventions, sources_from
from engine.params import CaptureOptions, LogprobOptions, SamplingParams
from engine.plan import plan
from engine.vectors import VectorStore
from tests.reference import assert_close, assert_unchanged, causal_attention, snapshot, stepwise_logits

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
N = 5  # generated tokens per case
TOL = 1e-4  # relative to the tensor's magnitude, as in test_capture
MIN_MARGIN = TOL  # the reference's top-2 logit gap at every step, relative: never a tie within the tolerance
OPS = vocabulary.INTERVENTION_OPS
# Every interventable site, as TransformerLens names ({} = the layer). test_sites_are_every_interventable_point
# checks this against the vocabulary.
SITES = (
    "hook_embed", "blocks.{}.hook_resid_pre", "blocks.{}.hook_resid_post", "blocks.{}.hook_attn_in",
    "blocks.{}.hook_attn_out", "blocks.{}.hook_mlp_in", "blocks.{}.hook_mlp_out", "blocks.{}.attn.hook_q",
    "blocks.{}.attn.hook_k", "blocks.{}.attn.hook_v", "blocks.{}.attn.hook_z", "blocks.{}.mlp.hook_post",
    "blocks.{}.ln1.hook_normalized", "blocks.{}.ln2.hook_normalized", "ln_final.hook_normalized",
)
REFUSED = ("blocks.{}.attn.hook_attn_scores", "blocks.{}.attn.hook_pattern", "blocks.{}.hook_resid_mid")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference's tensors are small: a second torch thread only waits on a core the engine (and
    anything else running) holds, which made every reference step ~20x slower on two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy(max_tokens: int = N) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


# --------------------------------------------------------------------------------------------
# The reference: transformers with torch hooks, greedy, no KV cache.
# --------------------------------------------------------------------------------------------
@dataclass
class RefEdit:
    """One intervention as the reference applies it, written from the spec (independently of
    engine/interventions.py). `source`: the clean reference's tensor, token-major."""

    site: str
    op: str
    positions: Any
    prompt_len: int
    heads: list[int] | None = None
    indices: list[int] | None = None
    coefficient: float | None = None
    vector: Any = None  # torch [n] or [heads, n]
    lo: float | None = None
    hi: float | None = None
    source: np.ndarray | None = None

    @classmethod
    def of(cls, spec: dict, prompt_len: int, source: np.ndarray | None = None, vector=None) -> "RefEdit":
        import torch

        v = vector if vector is not None else spec.get("vector")
        return cls(spec["layer_name"], spec["op"], spec.get("positions", "all"), prompt_len, spec.get("heads"),
                   spec.get("indices"), spec.get("coefficient"),
                   None if v is None else torch.tensor(np.asarray(v, np.float32)), spec.get("min"), spec.get("max"),
                   source)

    def covers(self, p: int) -> bool:
        if self.source is not None and p >= len(self.source):  # a patch changes only what the source holds
            return False
        if isinstance(self.positions, list):
            return p in self.positions
        return {"all": True, "prompt": p < self.prompt_len, "generated": p >= self.prompt_len}[self.positions]

    def apply(self, x):
        """x: [1, T, n], or [1, heads, T, d] on per-head sites; the edited copy."""
        import torch

        per_head = x.dim() == 4
        y = x.clone()
        heads = (self.heads if self.heads is not None else range(x.shape[1])) if per_head else [None]
        idx = torch.tensor(self.indices if self.indices is not None else range(x.shape[-1]))
        for p in range(x.shape[2 if per_head else 1]):
            if not self.covers(p):
                continue
            for h in heads:
                row = (x[0, h, p] if per_head else x[0, p])[idx]
                if per_head:
                    y[0, h, p, idx] = self._op(row, h, p, idx)
                else:
                    y[0, p, idx] = self._op(row, h, p, idx)
        return y

    def _op(self, r, h, p, idx):
        import torch

        v = self.vector
        if v is not None and v.dim() == 2:
            v = v[h]
        c = self.coefficient
        if self.op == "zero":
            return torch.zeros_like(r)
        if self.op == "scale":
            return r * c
        if self.op == "add":
            return r + (1.0 if c is None else c) * v
        if self.op == "set":
            return v.clone()
        if self.op == "project_out":
            u = v / torch.linalg.vector_norm(v)
            return r - (1.0 if c is None else c) * torch.dot(r, u) * u
        if self.op == "clamp":
            return torch.clamp(r, min=self.lo, max=self.hi)
        assert self.op == "patch"
        row = torch.from_numpy(self.source[p])
        return (row if h is None else row[h])[idx]


class Reference:
    """A transformers model whose hook points apply `edits` and, while `rec` is a dict, record
    every point's (edited) tensor token-major under its TransformerLens name."""

    def __init__(self, path, arch: str, tag: str):
        import torch
        import transformers
        from transformers import AttentionInterface

        self.torch = torch
        self.edits: list[RefEdit] = []
        self.rec: dict[str, np.ndarray] | None = None
        name = f"nsbridge_interventions_{tag}"
        AttentionInterface.register(name, self._attention)
        cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.AutoModelForCausalLM
        self.model = cls.from_pretrained(str(path), attn_implementation=name, dtype=torch.float32).eval()
        self.n_heads = self.model.config.num_attention_heads
        if arch == "gpt2":
            inner = self.model.transformer
            parts = [(b, b.attn, b.mlp, b.ln_1, b.ln_2, b.attn.c_proj, b.mlp.c_proj) for b in inner.h]
            embed, final = inner.wte, inner.ln_f  # wte only: the position embedding is added after it
        else:
            inner = self.model.model
            parts = [(b, b.self_attn, b.mlp, b.input_layernorm, b.post_attention_layernorm, b.self_attn.o_proj,
                      b.mlp.down_proj) for b in inner.layers]
            embed, final = inner.embed_tokens, inner.norm
        self._after(embed, "hook_embed")
        self._after(final, "ln_final.hook_normalized")
        for i, (block, attn, mlp, ln1, ln2, o_proj, down) in enumerate(parts):
            b = f"blocks.{i}."
            self._before(block, b + "hook_resid_pre")
            self._after(block, b + "hook_resid_post")
            self._before(attn, b + "hook_attn_in")
            self._after(attn, b + "hook_attn_out")
            self._before(mlp, b + "hook_mlp_in")
            self._after(mlp, b + "hook_mlp_out")
            self._after(ln1, b + "ln1.hook_normalized")
            self._before(ln2, b + "hook_resid_mid")
            self._after(ln2, b + "ln2.hook_normalized")
            self._before(o_proj, b + "attn.hook_z", per_head=True)
            self._before(down, b + "mlp.hook_post")

    # --- hook points ---
    def _point(self, name: str, x):
        """x: [1, T, n] or [1, H, T, d]."""
        for e in self.edits:
            if e.site == name:
                x = e.apply(x)
        if self.rec is not None:
            t = x[0] if x.dim() == 3 else x[0].transpose(0, 1)  # token-major
            self.rec[name] = t.detach().numpy().copy()
        return x

    def _before(self, module, name: str, per_head: bool = False):
        def through(x):
            if not per_head:
                return self._point(name, x)
            b, t, _ = x.shape  # [B, T, H*D]: each head's output side by side
            h = self._point(name, x.reshape(b, t, self.n_heads, -1).transpose(1, 2))
            return h.transpose(1, 2).reshape(b, t, -1)

        def hook(_mod, args, kwargs):
            if args:
                return (through(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": through(kwargs["hidden_states"])}

        module.register_forward_pre_hook(hook, with_kwargs=True)

    def _after(self, module, name: str):
        def hook(_mod, _args, output):
            if isinstance(output, tuple):
                return (self._point(name, output[0]), *output[1:])
            return self._point(name, output)

        module.register_forward_hook(hook)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b = f"blocks.{module.layer_idx}.attn."
        query = self._point(b + "hook_q", query)  # [1, H, T, D], after RoPE
        key = self._point(b + "hook_k", key)  # [1, KV, T, D], after RoPE
        value = self._point(b + "hook_v", value)
        scores, pattern, out = causal_attention(query, key, value, scaling)
        if self.rec is not None:
            self.rec[b + "hook_attn_scores"] = scores[0].transpose(0, 1).numpy().copy()
            self.rec[b + "hook_pattern"] = pattern[0].transpose(0, 1).numpy().copy()
        return out.transpose(1, 2).contiguous(), pattern

    # --- generation ---
    def logits(self, token_ids: list[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([token_ids]), use_cache=False).logits[0]

    def generate(self, prompt: list[int], n: int, edits: list[RefEdit], eos) -> tuple[list[int], dict, float]:
        """Greedy tokens (prompt + generated), every point's tensor over the final sequence, and the
        smallest relative gap between the two best logits at any step."""
        self.edits, seq, margin = list(edits), list(prompt), np.inf
        try:
            for _ in range(n):
                logits = self.logits(seq)[-1]
                top = self.torch.topk(logits, 2).values
                margin = min(margin, float(top[0] - top[1]) / max(1.0, float(logits.abs().max())))
                seq.append(int(self.torch.argmax(logits)))
                if seq[-1] in eos:
                    break
            self.rec = {}
            self.rec["logits"] = self.logits(seq).numpy().copy()
            return seq, self.rec, margin
        finally:
            self.edits, self.rec = [], None


# --------------------------------------------------------------------------------------------
# One model's setup: the engine model, the reference, prompts and the un-intervened runs.
# --------------------------------------------------------------------------------------------
@dataclass
class Setup:
    arch: str
    lm: Any
    ref: Reference
    layer: int  # the layer the block sites are taken at
    prompt: list[int]
    corrupt: list[int]  # the prompt with a few tokens changed: what patch cases run on
    hooks: list[dict]  # what every case captures
    clean: Completion  # the un-intervened run on `prompt` (all hooks): the patch source
    clean_ref: dict  # the reference's tensors over the clean run's sequence (patch sources)
    plain_corrupt: Completion  # the un-intervened run on `corrupt`
    eos: set

    def site(self, template: str) -> str:
        return template.format(self.layer)


def engine_run(lm, prompt, interventions, hooks=None, sources=None, max_tokens: int = N, vectors=None,
               capture=None) -> Completion:
    events = list(generate(plan(lm, prompt=prompt, sampling=greedy(max_tokens), hooks=hooks,
                                interventions=interventions, sources=sources, vectors=vectors, capture=capture)))
    return events[-1].result


def corrupted(prompt: list[int]) -> list[int]:
    """The chat prompt with a few of the question's tokens reversed."""
    out = list(prompt)
    out[-9:-4] = out[-9:-4][::-1]
    assert out != prompt
    return out


def make_setup(arch: str, lm, path, layer: int, prompt: list[int], corrupt: list[int],
               hooks: list[dict] | None = None) -> Setup:
    ref = Reference(path, arch, f"{arch}_{lm.info.n_layers}")
    assert len(corrupt) == len(prompt) and corrupt != prompt
    if hooks is None:  # every hook point of the model (the tiny models are dense: no router)
        hooks = [{"layer_name": p["name"]} for p in hook_points(lm)]
    eos = set(lm.tokenizer.eos_token_ids)
    clean = engine_run(lm, prompt, None, hooks)
    tokens, clean_ref, _ = ref.generate(prompt, N, [], eos)
    assert tokens == clean.token_ids  # the reference runs the same model
    plain_corrupt = engine_run(lm, corrupt, None, hooks)
    assert plain_corrupt.token_ids[len(prompt):] != clean.token_ids[len(prompt):]  # patching can matter
    return Setup(arch, lm, ref, layer, prompt, corrupt, hooks, clean, clean_ref, plain_corrupt, eos)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request) -> Setup:
    arch = request.param
    lm = request.getfixturevalue(f"tiny_{arch}")
    prompt = lm.chat_prompt(PROMPT)
    return make_setup(arch, lm, request.getfixturevalue(f"tiny_{arch}_path"), 1, prompt, corrupted(prompt))


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


# --------------------------------------------------------------------------------------------
# The cases: one spec per (site, op), with vectors and bounds sized from the clean run.
# --------------------------------------------------------------------------------------------
def case_spec(s: Setup, site: str, op: str, variant: int) -> dict:
    """An intervention of `op` at `site` that changes the tensor a lot. `variant` rotates through
    positions (all, prompt, generated, a list), heads, indices and per-head vectors."""
    rng = np.random.default_rng(zlib.crc32(f"{s.arch}/{site}/{op}".encode()))
    values = s.clean.capture.arrays()[site]  # token-major: [T, n] or [T, heads, d]
    per_head = values.ndim == 3
    n_heads, n = (values.shape[1] if per_head else None), values.shape[-1]
    p = len(s.prompt)
    spec: dict[str, Any] = {"layer_name": site, "op": op,
                            "positions": ["all", "prompt", "generated", [2, p - 1, p + 1]][variant % 4]}
    if per_head and variant % 3:
        spec["heads"] = [[1], [0, n_heads - 1]][variant % 3 - 1]
    # Zeroing the whole final norm would make every logit 0: a tie, not a test.
    if (variant // 2) % 3 == 0 or (op == "zero" and site == "ln_final.hook_normalized"):
        spec["indices"] = sorted(int(i) for i in rng.choice(n, n // 2, replace=False))
    k = len(spec.get("indices", range(n)))
    chosen = values[..., spec["indices"]] if "indices" in spec else values
    rms = float(np.sqrt(np.mean(chosen ** 2)))
    two_d = per_head and variant % 2 == 0  # a [heads, k] vector

    def vector(scale: float):
        return (rng.standard_normal((n_heads, k) if two_d else (k,)) * scale).tolist()

    if op == "scale":
        spec["coefficient"] = [-1.5, 3.0, -0.5, 5.0][variant % 4]
    elif op == "add":
        spec["vector"] = vector(4 * rms)
        coefficient = [None, 2.0, -1.0, 0.5][variant % 4]
        if coefficient is not None:
            spec["coefficient"] = coefficient
    elif op == "set":
        spec["vector"] = vector(2 * rms)
    elif op == "project_out":  # the site's mean over the prompt (what it carries most), plus noise
        mean = chosen[:p].mean(axis=0)
        direction = mean if two_d else (mean.mean(axis=0) if per_head else mean)
        spec["vector"] = (direction + rng.standard_normal(direction.shape) * 0.5 * rms).tolist()
        coefficient = [2.0, None, 3.0, 1.5][variant % 4]
        if coefficient is not None:
            spec["coefficient"] = coefficient
    elif op == "clamp":
        q = lambda f: float(np.quantile(chosen, f))  # noqa: E731
        spec.update([{"min": q(0.3)}, {"max": q(0.7)}, {"min": q(0.25), "max": q(0.75)},
                     {"min": q(0.45), "max": q(0.55)}][variant % 4])
    elif op == "patch":
        spec["source"] = {"capture_id": s.clean.capture.capture_id, "hook_id": site}
    return spec


def covered(spec: dict, p: int, prompt_len: int, held: int | None = None) -> bool:
    if held is not None and p >= held:
        return False
    positions = spec.get("positions", "all")
    if isinstance(positions, list):
        return p in positions
    return {"all": True, "prompt": p < prompt_len, "generated": p >= prompt_len}[positions]


def expected_touched(spec: dict, prompt_len: int, total: int, steps: int, held: int | None = None) -> list[int]:
    """Positions touched per step: step 0 is the prompt [0, P), step k >= 1 is position P + k - 1."""
    windows = [range(prompt_len)] + [range(q, q + 1) for q in range(prompt_len, total)]
    return [sum(covered(spec, q, prompt_len, held) for q in w) for w in windows[:steps]]


def ref_edits(s: Setup, specs: list[dict], prompt_len: int, vectors=None) -> list[RefEdit]:
    return [RefEdit.of(spec, prompt_len, s.clean_ref[spec["layer_name"]] if spec["op"] == "patch" else None,
                       vectors.get(spec["vector_id"]).data if "vector_id" in spec else None)
            for spec in specs]


def check_against_reference(s: Setup, specs: list[dict], prompt: list[int], vectors=None,
                            n: int = N) -> tuple[Completion, dict]:
    """Run `specs` on our engine and on the reference; everything must agree. -> our completion and
    the reference's tensors."""
    res = engine_run(s.lm, prompt, specs, s.hooks, sources_from(s.clean.capture), vectors=vectors, max_tokens=n)
    tokens, ref, margin = s.ref.generate(prompt, n, ref_edits(s, specs, len(prompt), vectors), s.eos)
    assert margin > MIN_MARGIN, f"ill-posed case: a near-tie in the reference's greedy choice ({margin:.1e})"
    assert res.token_ids == tokens, f"tokens {res.token_ids[len(prompt):]} != reference {tokens[len(prompt):]}"
    arrays = res.capture.arrays()
    assert set(arrays) == {h["layer_name"] for h in s.hooks}
    for name, got in arrays.items():
        assert_close(got, ref[name], TOL, name)
    held = len(s.clean.token_ids)
    steps = len(res.token_ids) - len(prompt) + 1  # with hooks: one step more, for the last token's own
    assert [r["positions_touched"] for r in res.interventions] == [
        expected_touched(spec, len(prompt), len(res.token_ids), steps, held if spec["op"] == "patch" else None)
        for spec in specs]
    assert [(r["index"], r["layer_name"], r["op"]) for r in res.interventions] == [
        (i, spec["layer_name"], spec["op"]) for i, spec in enumerate(specs)]
    return res, ref


def check_case(s: Setup, template: str, op: str, variant: int) -> bool:
    """One (site, op) case against the reference, plus: the intervention really changed the tensor
    (a patch wrote exactly the source's rows). -> whether the generated tokens changed."""
    site = s.site(template)
    spec = case_spec(s, site, op, variant)
    prompt, base = (s.corrupt, s.plain_corrupt) if op == "patch" else (s.prompt, s.clean)
    res, _ = check_against_reference(s, [spec], prompt)
    got, before = res.capture.arrays()[site], base.capture.arrays()[site]
    held = len(s.clean.token_ids) if op == "patch" else None
    touched = [q for q in range(len(res.token_ids)) if covered(spec, q, len(prompt), held)]
    assert touched
    if op == "patch":  # the touched rows are the source's, exactly (in the chosen heads and entries)
        source = s.clean.capture.arrays()[site]
        heads = (spec["heads"],) if "heads" in spec else ()
        for q in touched:
            row, want = got[q][heads], source[q][heads]
            if "indices" in spec:
                row, want = row[..., spec["indices"]], want[..., spec["indices"]]
            assert np.array_equal(row, want), f"position {q} is not the source's"
    else:  # the first touched position saw the same tokens as the un-intervened run, and changed
        q = touched[0]
        assert res.token_ids[:q + 1] == base.token_ids[:q + 1]
        assert not np.allclose(got[q], before[q], rtol=1e-3, atol=1e-3), "the intervention changed nothing"
    return res.token_ids != base.token_ids


CHANGED: dict[tuple[str, str, str], bool] = {}  # (arch, site template, op) -> the generated tokens changed


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("template", SITES)
def test_intervention_equals_transformers(setup, template, op):
    """Every op on every interventable site: tokens, every captured tensor at every position, and the
    positions touched per step equal the no-cache reference."""
    CHANGED[(setup.arch, template, op)] = check_case(setup, template, op, SITES.index(template) * len(OPS) +
                                                     OPS.index(op))


def test_interventions_change_the_generation(setup):
    """The cases above are not vacuous: most of them change the generated tokens (and every op does,
    on most sites). Runs after them (same module-scoped parameter); skipped when only some ran."""
    seen = {k[1:]: v for k, v in CHANGED.items() if k[0] == setup.arch}
    if len(seen) < len(SITES) * len(OPS):
        pytest.skip("needs every case of test_intervention_equals_transformers in this run")
    assert sum(seen.values()) >= 0.75 * len(seen), f"only {sum(seen.values())} of {len(seen)} changed the tokens"
    for op in OPS:
        assert sum(seen[t, op] for t in SITES) >= len(SITES) // 2, op


def test_sites_are_every_interventable_point(tiny_llama):
    """SITES is every hook point that may be intervened on; the refused ones are the rest."""
    names = {p["name"] for p in hook_points(tiny_llama) if p["name"].startswith(("blocks.1.", "hook_", "ln_final"))}
    assert {t.format(1) for t in SITES} | {t.format(1) for t in REFUSED} == names
    assert not {t.format(1) for t in SITES} & {t.format(1) for t in REFUSED}
    interventable = {name for name, site in vocabulary.hook_point_names(3)  # (a dense model: no router)
                     if site.component not in vocabulary.NOT_INTERVENABLE and not name.endswith("hook_resid_mid")
                     and site.site != "router"}
    assert interventable == {t.format(i) for t in SITES for i in range(3)}


# --------------------------------------------------------------------------------------------
# Combinations, other names, stored vectors
# --------------------------------------------------------------------------------------------
def test_interventions_apply_in_order_at_a_shared_site(setup):
    s, site = setup, setup.site("blocks.{}.hook_resid_post")
    rng = np.random.default_rng(7)
    add = {"layer_name": site, "op": "add", "vector": (rng.standard_normal(64) * 3).tolist()}
    scale = {"layer_name": site, "op": "scale", "coefficient": -2.0, "positions": "generated"}
    first, _ = check_against_reference(s, [add, scale], s.prompt)
    second, _ = check_against_reference(s, [scale, add], s.prompt)
    assert not np.allclose(first.capture.arrays()[site], second.capture.arrays()[site])


def test_interventions_at_several_sites_together(setup):
    s = setup
    p = len(s.prompt)
    heads = s.lm.info.n_heads
    specs = [
        {"layer_name": "blocks.0.attn.hook_k", "op": "scale", "coefficient": 4.0, "positions": "prompt", "heads": [1]},
        {"layer_name": "blocks.0.attn.hook_v", "op": "add", "positions": [p - 1, p + 1],
         "vector": np.linspace(-3, 3, s.lm.info.d_head).tolist()},
        {"layer_name": "blocks.1.attn.hook_z", "op": "zero", "heads": [heads - 1]},
        {"layer_name": "blocks.1.mlp.hook_post", "op": "clamp", "max": 0.1, "positions": "generated"},
        {"layer_name": "blocks.2.attn.hook_q", "op": "set", "vector": [[0.5] * s.lm.info.d_head] * heads,
         "positions": [3, 5, p]},
        {"layer_name": "blocks.2.hook_resid_pre", "op": "patch", "positions": [p - 2, p + 2],
         "source": {"capture_id": s.clean.capture.capture_id, "hook_id": "blocks.2.hook_resid_pre"}},
    ]
    res, _ = check_against_reference(s, specs, s.corrupt)
    assert res.token_ids != s.plain_corrupt.token_ids


def test_other_names_intervene_on_the_same_tensor(setup):
    """Model paths and NeuroScope names with a component reach the same site as the TransformerLens name."""
    s = setup
    gpt2 = s.arch == "gpt2"
    attn, ln2 = ("attn", "ln_2") if gpt2 else ("self_attn", "post_attention_layernorm")
    d, d_head, d_mlp = s.lm.info.d_model, s.lm.info.d_head, s.lm.info.d_mlp
    pairs = [
        ("blocks.1.hook_resid_post", {"layer_name": "model.layers.1", "component": "residual"}, d),
        ("blocks.1.hook_attn_out", {"layer_name": "transformer.h.1", "component": "attention"}, d),
        ("blocks.1.hook_mlp_out", {"layer_name": "model.layers.1.mlp", "component": "mlp"}, d),
        ("blocks.1.attn.hook_k", {"layer_name": f"model.layers.1.{attn}", "component": "key"}, d_head),
        ("blocks.1.attn.hook_z", {"layer_name": "transformer.h.1", "component": "head_output"}, d_head),
        ("blocks.1.mlp.hook_post", {"layer_name": "transformer.h.1.mlp", "component": "mlp_activation"}, d_mlp),
        ("blocks.1.ln1.hook_normalized", {"layer_name": "model.layers.1", "component": "layernorm"}, d),
        ("blocks.1.ln2.hook_normalized", {"layer_name": f"model.layers.1.{ln2}", "component": "layernorm"}, d),
        ("hook_embed", {"layer_name": "transformer.wte", "component": "embedding"}, d),
        ("ln_final.hook_normalized", {"layer_name": "model.norm", "component": "layernorm"}, d),
        ("ln_final.hook_normalized", {"layer_name": "transformer.ln_f"}, d),
    ]
    rng = np.random.default_rng(3)
    for tl, other, n in pairs:
        op = {"op": "add", "vector": (rng.standard_normal(n) * 2).tolist(), "positions": "generated"}
        a = engine_run(s.lm, s.prompt, [{"layer_name": tl, **op}], s.hooks)
        b = engine_run(s.lm, s.prompt, [{**other, **op}], s.hooks)
        assert a.token_ids == b.token_ids, (tl, other)
        assert a.interventions[0]["component"] == b.interventions[0]["component"]
        assert a.interventions[0]["positions_touched"] == b.interventions[0]["positions_touched"]
        for name, arr in a.capture.arrays().items():
            assert np.array_equal(arr, b.capture.arrays()[name]), (tl, other, name)
        assert not np.array_equal(a.capture.arrays()[tl], s.clean.capture.arrays()[tl]), tl  # it did something


def test_stored_vector_equals_inline_vector(setup):
    s = setup
    store = VectorStore(s.lm.info.dims)
    rng = np.random.default_rng(11)
    for site, shape, op in [("blocks.1.hook_resid_post", (64,), "add"),
                            ("blocks.1.attn.hook_k", (s.lm.info.n_kv_heads, s.lm.info.d_head), "project_out"),
                            ("blocks.1.attn.hook_q", (s.lm.info.d_head,), "set")]:
        data = (rng.standard_normal(shape) * 2).astype(np.float32)
        vec = store.add(data)
        inline = {"layer_name": site, "op": op, "vector": data.tolist(), "positions": "all"}
        stored = {"layer_name": site, "op": op, "vector_id": vec.vector_id, "positions": "all"}
        a = engine_run(s.lm, s.prompt, [inline], s.hooks)
        b = engine_run(s.lm, s.prompt, [stored], s.hooks, vectors=store)
        assert a.token_ids == b.token_ids
        for name, arr in a.capture.arrays().items():
            assert np.array_equal(arr, b.capture.arrays()[name]), (site, name)
        check_against_reference(s, [stored], s.prompt, vectors=store)  # the reference gets the numbers


def test_patching_the_whole_residual_stream_reproduces_the_clean_run_exactly(setup):
    """Patching block 0's input at every position from the clean run turns the corrupted prompt's
    run into the clean one, bit for bit (tokens and every tensor after the patch)."""
    s = setup
    spec = {"layer_name": "blocks.0.hook_resid_pre", "op": "patch",
            "source": {"capture_id": s.clean.capture.capture_id, "hook_id": "blocks.0.hook_resid_pre"}}
    res = engine_run(s.lm, s.corrupt, [spec], s.hooks, sources_from(s.clean.capture))
    assert s.plain_corrupt.token_ids[len(s.corrupt):] != s.clean.token_ids[len(s.prompt):]
    assert res.token_ids[len(s.corrupt):] == s.clean.token_ids[len(s.prompt):]
    clean = s.clean.capture.arrays()
    for name, arr in res.capture.arrays().items():
        if name != "hook_embed":  # the embedding is the corrupted tokens' (before the patch)
            assert np.array_equal(arr, clean[name]), name


@pytest.mark.parametrize("step", [5, 8])
def test_key_and_value_edits_survive_the_cache_growing(setup, monkeypatch, step):
    """mlx-lm's KV cache grows in blocks of `KVCache.step` (256) slots, reallocating as decoding
    passes a block's end; with small blocks the tiny models cross them, and the edited keys and
    values must move along. The prompt has 24 tokens. Step 5: the prefill allocates 25 slots, the
    first decode step takes the last one, the next grows the cache; step 8: the first one grows it."""
    from mlx_lm.models.cache import KVCache

    s = setup
    monkeypatch.setattr(KVCache, "step", step)
    p = len(s.prompt)
    specs = [{"layer_name": "blocks.0.attn.hook_k", "op": "scale", "coefficient": -3.0, "positions": "prompt"},
             {"layer_name": "blocks.1.attn.hook_v", "op": "add", "heads": [1], "positions": [3, p - 1, p + 1],
              "vector": np.linspace(-6, 6, s.lm.info.d_head).tolist()},
             {"layer_name": "blocks.2.attn.hook_k", "op": "set", "positions": "generated", "heads": [0],
              "vector": np.linspace(3, -3, s.lm.info.d_head).tolist()}]
    res, _ = check_against_reference(s, specs, s.prompt)
    assert res.token_ids != s.clean.token_ids
    monkeypatch.undo()
    again = engine_run(s.lm, s.prompt, specs, s.hooks)
    assert again.token_ids == res.token_ids


# --------------------------------------------------------------------------------------------
# Positions touched
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions,want", [  # functions of the prompt's length P
    (lambda p: "all", lambda p: [p, 1, 1, 1, 1, 1]),
    (lambda p: "prompt", lambda p: [p, 0, 0, 0, 0, 0]),
    (lambda p: "generated", lambda p: [0, 1, 1, 1, 1, 1]),
    (lambda p: [3, p + 1], lambda p: [1, 0, 1, 0, 0, 0]),
    (lambda p: [p - 1, p, p + 4, p + 40], lambda p: [1, 1, 0, 0, 0, 1]),
], ids=["all", "prompt", "generated", "3,P+1", "P-1,P,P+4,P+40"])
@pytest.mark.parametrize("site", ["blocks.0.hook_resid_post", "blocks.2.attn.hook_v", "blocks.1.mlp.hook_post"])
def test_positions_touched_per_step(tiny_llama, site, positions, want):
    """Step 0 is the prompt, step k >= 1 the token at position P + k - 1; with hooks, one more step
    gives the last token its own activations (and is intervened on too). Without hooks it is not run."""
    lm = tiny_llama
    prompt = lm.chat_prompt(PROMPT)
    p = len(prompt)
    spec = {"layer_name": site, "op": "scale", "coefficient": 1.0, "positions": positions(p)}  # no early end
    with_hooks = engine_run(lm, prompt, [spec], [{"layer_name": "blocks.2.hook_resid_post"}])
    assert len(with_hooks.token_ids) == p + N
    assert with_hooks.interventions == [{"index": 0, "layer_name": site, "component": vocabulary.resolve_name(
        site, None, 3).component, "op": "scale", "positions_touched": want(p)}]
    without = engine_run(lm, prompt, [spec])
    assert without.token_ids == with_hooks.token_ids
    assert without.interventions[0]["positions_touched"] == want(p)[:N]
    assert without.capture is None


# --------------------------------------------------------------------------------------------
# Nothing to do changes nothing, bit for bit
# --------------------------------------------------------------------------------------------
def _logprobs(lm, prompt, **kw):
    events = list(generate(plan(lm, prompt=prompt, sampling=greedy(), logprobs=LogprobOptions(
        logprobs=True, top_logprobs=20), **kw)))
    return [e.token for e in events], [(lp.token, lp.logprob, lp.top) for lp in events[-1].result.logprobs]


def test_no_interventions_is_a_plain_run(tiny):
    prompt = tiny.chat_prompt(PROMPT)
    plain = _logprobs(tiny, prompt)
    assert _logprobs(tiny, prompt, interventions=[]) == plain
    assert _logprobs(tiny, prompt, interventions=None) == plain
    res = engine_run(tiny, prompt, [])
    assert res.interventions == [] and res.capture is None


def _identity_specs(lm, prompt, clean) -> list[dict]:
    """Interventions that change no value: scale by 1 on every interventable site of every layer,
    adding zeros, a clamp that binds nowhere, one that touches no position, and patches from a
    clean run of the same prompt (the values it would compute anyway)."""
    info = lm.info
    names = [t.format(i) for t in SITES for i in range(info.n_layers)]
    names = list(dict.fromkeys(names))
    specs = [{"layer_name": n, "op": "scale", "coefficient": 1.0} for n in names]
    specs += [
        {"layer_name": "blocks.1.attn.hook_k", "op": "add", "vector": [[0.0] * info.d_head] * info.n_kv_heads},
        {"layer_name": "blocks.2.attn.hook_v", "op": "add", "vector": [0.0] * info.d_head, "heads": [0]},
        {"layer_name": "blocks.0.hook_resid_post", "op": "add", "vector": [0.0] * info.d_model, "coefficient": 5.0},
        {"layer_name": "blocks.1.mlp.hook_post", "op": "clamp", "min": -1e30, "max": 1e30},
        {"layer_name": "blocks.0.hook_resid_pre", "op": "zero", "positions": [len(prompt) + 50]},
    ]
    for site in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_k", "blocks.2.attn.hook_v", "blocks.1.attn.hook_z",
                 "blocks.2.mlp.hook_post"):
        specs.append({"layer_name": site, "op": "patch", "source": {"capture_id": clean.capture.capture_id,
                                                                      "hook_id": site}})
    return specs


def test_interventions_that_change_no_value_leave_logits_bit_identical(tiny):
    """Every site tapped, keys and values written back into the cache, patches copied in: the
    logits of every step are bit-identical to a plain run."""
    prompt = tiny.chat_prompt(PROMPT)
    hooks = [{"layer_name": p["name"]} for p in hook_points(tiny)]
    clean = engine_run(tiny, prompt, None, hooks)
    specs = _identity_specs(tiny, prompt, clean)
    plain = stepwise_logits(tiny, prompt, N)
    resolved = resolve_interventions(tiny, intervention_specs(specs), len(prompt), sources=sources_from(clean.capture))
    capture = Capture(tiny, [], CaptureOptions(), resolved)
    with capture.installed(tiny):
        edited = stepwise_logits(tiny, prompt, N, capture)
    idle = next(i for i, sp in enumerate(specs) if sp["op"] == "zero")
    assert [sum(t) > 0 for t in capture.touched] == [i != idle for i in range(len(specs))]  # they ran
    for step, (a, b) in enumerate(zip(plain, edited)):
        assert np.array_equal(a, b), f"step {step}"
    # The same through generate, with hooks: logprobs and every captured tensor.
    assert _logprobs(tiny, prompt, interventions=specs, sources=sources_from(clean.capture)) == _logprobs(tiny, prompt)
    res = engine_run(tiny, prompt, specs, hooks, sources_from(clean.capture))
    for name, arr in res.capture.arrays().items():
        assert np.array_equal(arr, clean.capture.arrays()[name]), name


# --------------------------------------------------------------------------------------------
# Interventions leave no trace
# --------------------------------------------------------------------------------------------
def _strong_specs(lm, prompt, clean) -> list[dict]:
    info = lm.info
    return [
        {"layer_name": "blocks.0.attn.hook_k", "op": "scale", "coefficient": 5.0, "positions": "prompt"},
        {"layer_name": "blocks.1.attn.hook_v", "op": "add", "vector": [3.0] * info.d_head},
        {"layer_name": "blocks.1.attn.hook_z", "op": "zero", "heads": [0]},
        {"layer_name": "blocks.2.mlp.hook_post", "op": "clamp", "max": 0.0},
        {"layer_name": "hook_embed", "op": "set", "vector": [0.5] * info.d_model, "positions": [2]},
        {"layer_name": "blocks.1.hook_resid_post", "op": "patch",
         "source": {"capture_id": clean.capture.capture_id, "hook_id": "blocks.1.hook_resid_post"}},
    ]


def test_model_unchanged_after_a_request_with_interventions(tiny):
    prompt = tiny.chat_prompt(PROMPT)
    before = snapshot(tiny)
    plain = _logprobs(tiny, prompt)
    clean = engine_run(tiny, prompt, None, [{"layer_name": "blocks.1.hook_resid_post"}])
    kept = clean.capture.arrays()["blocks.1.hook_resid_post"].copy()
    res = engine_run(tiny, corrupted(prompt), _strong_specs(tiny, prompt, clean),
                     [{"layer_name": "blocks.1.hook_resid_post"}], sources_from(clean.capture))
    assert res.token_ids[len(prompt):] != plain[0]
    assert_unchanged(tiny, before)
    assert _logprobs(tiny, prompt) == plain
    assert np.array_equal(clean.capture.arrays()["blocks.1.hook_resid_post"], kept)  # the source is only read


@pytest.mark.parametrize("how", ["close", "throw", "raise-inside"])
def test_model_unchanged_after_an_interrupted_request_with_interventions(tiny, monkeypatch, how):
    prompt = tiny.chat_prompt(PROMPT)
    before = snapshot(tiny)
    plain = _logprobs(tiny, prompt)
    clean = engine_run(tiny, prompt, None, [{"layer_name": "blocks.1.hook_resid_post"}])
    specs = _strong_specs(tiny, prompt, clean)
    if how == "raise-inside":
        apply = Intervention.apply

        def failing(self, x, start):
            if start > len(prompt):
                raise RuntimeError("boom")
            return apply(self, x, start)

        monkeypatch.setattr(Intervention, "apply", failing)
    events = generate(plan(tiny, prompt=corrupted(prompt), sampling=greedy(), interventions=specs,
                           hooks=[{"layer_name": "blocks.0.hook_resid_post"}], sources=sources_from(clean.capture)))
    first = next(events)
    assert first.capture is not None
    if how == "close":
        events.close()
    elif how == "throw":
        with pytest.raises(KeyboardInterrupt):
            events.throw(KeyboardInterrupt())
    else:
        with pytest.raises(RuntimeError, match="boom"):
            list(events)
        monkeypatch.undo()
    assert_unchanged(tiny, before)
    assert _logprobs(tiny, prompt) == plain
    steps = len(first.capture.records[0].steps)
    engine_run(tiny, prompt, specs, [{"layer_name": "blocks.0.hook_resid_post"}], sources_from(clean.capture))
    assert len(first.capture.records[0].steps) == steps  # the interrupted capture is not fed later


# --------------------------------------------------------------------------------------------
# Bad interventions
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def error_context(tiny_llama, tiny_gpt2):
    lm = tiny_llama
    prompt = lm.chat_prompt(PROMPT)
    hooks = [{"layer_name": n} for n in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                         "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post")]
    full = engine_run(lm, prompt, None, hooks)
    prompt_only = engine_run(lm, prompt, None, hooks[1:2], capture=CaptureOptions(positions="prompt"))
    other = engine_run(tiny_gpt2, prompt, None, [{"layer_name": "blocks.1.mlp.hook_post"}])
    store = VectorStore(lm.info.dims)
    return {"lm": lm, "prompt": prompt, "P": len(prompt), "full": full.capture.capture_id,
            "prompt_only": prompt_only.capture.capture_id, "gpt2": other.capture.capture_id,
            "sources": sources_from(full.capture, prompt_only.capture, other.capture), "store": store}


R = "blocks.1.hook_resid_post"
V64 = [0.5] * 64


def _patch(cap: str, hook: str = R, **kw) -> dict:
    return {"layer_name": R, "op": "patch", "source": {"capture_id": cap, "hook_id": hook}, **kw}


ERRORS = [  # (id, interventions given the context, error class, the argument it names, needles in its message)
    ("not-a-list", lambda c: {"layer_name": R, "op": "zero"}, InvalidArgument, "interventions", ["must be a list"]),
    ("not-an-object", lambda c: [R], InvalidArgument, "interventions[0]", ["must be an object", repr(R)]),
    ("no-op", lambda c: [{"layer_name": R}], InvalidArgument, "interventions[0].op", ["op"]),
    ("unknown-op", lambda c: [{"layer_name": R, "op": "negate"}], InvalidArgument, "interventions[0].op",
     ["'zero'", "'patch'"]),
    ("unknown-field", lambda c: [{"layer_name": R, "op": "scale", "coefficient": 2.0, "factor": 2}], InvalidArgument,
     "interventions[0].factor", ["not permitted"]),
    ("unknown-layer", lambda c: [{"layer_name": "blocks.3.hook_resid_post", "op": "zero"}], UnknownHook,
     "interventions[0].layer_name", ["3 layers", "0 to 2"]),
    ("unknown-site", lambda c: [{"layer_name": "blocks.0.hook_resid_postt", "op": "zero"}], UnknownHook,
     "interventions[0].layer_name", ["hook_resid_postt", "blocks.N.hook_resid_pre"]),
    ("unknown-component", lambda c: [{"layer_name": "model.layers.0", "component": "resid", "op": "zero"}],
     UnknownHook, "interventions[0].component", ["unknown component", "residual"]),
    ("missing-component", lambda c: [{"layer_name": "model.layers.0", "op": "zero"}], InvalidArgument,
     "interventions[0].component", ["needs a 'component'"]),
    ("scores", lambda c: [{"layer_name": "blocks.0.attn.hook_attn_scores", "op": "zero"}], InvalidArgument,
     "interventions[0].layer_name", ["attention_scores cannot be intervened on", "query, key, value or head_output"]),
    ("pattern", lambda c: [{"layer_name": "blocks.2.attn.hook_pattern", "op": "scale", "coefficient": 2.0}],
     InvalidArgument, "interventions[0].layer_name", ["attention_pattern cannot be intervened on"]),
    ("pattern-by-component", lambda c: [{"layer_name": "model.layers.0", "component": "attention_pattern",
                                         "op": "zero"}], InvalidArgument, "interventions[0].component",
     ["attention_pattern cannot be intervened on"]),
    ("resid-mid", lambda c: [{"layer_name": "blocks.1.hook_resid_mid", "op": "zero"}], InvalidArgument,
     "interventions[0].layer_name", ["hook_resid_mid", "blocks.1.hook_attn_out", "blocks.2.hook_resid_pre"]),
    ("vector-on-zero", lambda c: [{"layer_name": R, "op": "zero", "vector": V64}], InvalidArgument,
     "interventions[0].vector", ["'vector' does not apply to op 'zero'", "nothing"]),
    ("coefficient-on-set", lambda c: [{"layer_name": R, "op": "set", "vector": V64, "coefficient": 2.0}],
     InvalidArgument, "interventions[0].coefficient", ["'coefficient' does not apply to op 'set'"]),
    ("bound-on-scale", lambda c: [{"layer_name": R, "op": "scale", "coefficient": 2.0, "min": 0.0}],
     InvalidArgument, "interventions[0].min", ["'min' does not apply to op 'scale'", "coefficient"]),
    ("source-on-add", lambda c: [{"layer_name": R, "op": "add", "vector": V64,
                                  "source": {"capture_id": c["full"], "hook_id": R}}], InvalidArgument,
     "interventions[0].source", ["'source' does not apply to op 'add'"]),
    ("vector-id-on-clamp", lambda c: [{"layer_name": R, "op": "clamp", "min": 0.0, "vector_id": "v"}],
     InvalidArgument, "interventions[0].vector_id", ["does not apply to op 'clamp'"]),
    ("heads-on-residual", lambda c: [{"layer_name": R, "op": "zero", "heads": [0]}], InvalidArgument,
     "interventions[0].heads", ["per-head sites", "residual"]),
    ("scale-without-coefficient", lambda c: [{"layer_name": R, "op": "scale"}], InvalidArgument,
     "interventions[0].coefficient", ["'scale' needs a 'coefficient'"]),
    ("clamp-without-bounds", lambda c: [{"layer_name": R, "op": "clamp"}], InvalidArgument, "interventions[0].min",
     ["'clamp' needs 'min', 'max' or both"]),
    ("clamp-min-above-max", lambda c: [{"layer_name": R, "op": "clamp", "min": 1.0, "max": 0.0}], InvalidArgument,
     "interventions[0].min", ["min (1.0) is above max (0.0)"]),
    ("add-without-vector", lambda c: [{"layer_name": R, "op": "add"}], InvalidArgument, "interventions[0].vector",
     ["exactly one of 'vector'", "'vector_id'"]),
    ("add-with-both-vectors", lambda c: [{"layer_name": R, "op": "add", "vector": V64, "vector_id": "v"}],
     InvalidArgument, "interventions[0].vector", ["exactly one of 'vector'"]),
    ("vector-length", lambda c: [{"layer_name": R, "op": "add", "vector": [1.0] * 63}], InvalidArgument,
     "interventions[0].vector", ["63 numbers", "needs 64 (the site's last axis)"]),
    ("vector-length-neurons", lambda c: [{"layer_name": "blocks.0.mlp.hook_post", "op": "set", "vector": V64}],
     InvalidArgument, "interventions[0].vector", ["64 numbers", "needs 128"]),
    ("vector-length-indices", lambda c: [{"layer_name": R, "op": "add", "vector": V64, "indices": [0, 1, 2]}],
     InvalidArgument, "interventions[0].vector", ["64 numbers", "3 (one per index)"]),
    ("vector-ragged", lambda c: [{"layer_name": "blocks.0.attn.hook_q", "op": "add", "vector": [[1.0, 2.0], [3.0]]}],
     InvalidArgument, "interventions[0].vector", ["ragged"]),
    ("vector-2d-on-residual", lambda c: [{"layer_name": R, "op": "add", "vector": [V64, V64]}], InvalidArgument,
     "interventions[0].vector", ["must be 1-D [64]", "[2, 64]"]),
    ("per-head-vector-shape", lambda c: [{"layer_name": "blocks.0.attn.hook_q", "op": "add",
                                          "vector": [[0.0] * 16] * 3}], InvalidArgument, "interventions[0].vector",
     ["[4, 16]", "[3, 16]"]),
    ("per-kv-head-vector-shape", lambda c: [{"layer_name": "blocks.0.attn.hook_k", "op": "set",
                                             "vector": [[0.0] * 16] * 4}], InvalidArgument, "interventions[0].vector",
     ["[2, 16]", "[4, 16]"]),
    ("vector-non-finite", lambda c: [{"layer_name": R, "op": "add", "vector": [float("nan")] + V64[1:]}],
     InvalidArgument, "interventions[0].vector", ["non-finite"]),
    ("project-out-zero-vector", lambda c: [{"layer_name": R, "op": "project_out", "vector": [0.0] * 64}],
     InvalidArgument, "interventions[0].vector", ["non-zero vector"]),
    ("head-out-of-range", lambda c: [{"layer_name": "blocks.0.attn.hook_q", "op": "zero", "heads": [1, 4]}],
     InvalidArgument, "interventions[0].heads", ["head 4 does not exist", "4 heads", "0 to 3"]),
    ("kv-head-out-of-range", lambda c: [{"layer_name": "blocks.0.attn.hook_v", "op": "zero", "heads": [2]}],
     InvalidArgument, "interventions[0].heads", ["head 2 does not exist", "value has 2 heads"]),
    ("head-output-head-out-of-range", lambda c: [{"layer_name": "blocks.0.attn.hook_z", "op": "zero",
                                                  "heads": [7]}], InvalidArgument, "interventions[0].heads",
     ["head 7", "head_output has 4 heads"]),
    ("head-negative", lambda c: [{"layer_name": "blocks.0.attn.hook_q", "op": "zero", "heads": [-1]}],
     InvalidArgument, "interventions[0].heads[0]", ["greater than or equal to 0"]),
    ("heads-empty", lambda c: [{"layer_name": "blocks.0.attn.hook_q", "op": "zero", "heads": []}],
     InvalidArgument, "interventions[0].heads", ["at least 1"]),
    ("index-out-of-range", lambda c: [{"layer_name": R, "op": "zero", "indices": [3, 64]}], InvalidArgument,
     "interventions[0].indices", ["index 64", "64 entries", "0 to 63"]),
    ("index-out-of-range-head", lambda c: [{"layer_name": "blocks.0.attn.hook_k", "op": "zero", "indices": [16]}],
     InvalidArgument, "interventions[0].indices", ["index 16", "16 entries"]),
    ("index-out-of-range-neurons", lambda c: [{"layer_name": "blocks.0.mlp.hook_post", "op": "zero",
                                               "indices": [128]}], InvalidArgument, "interventions[0].indices",
     ["index 128", "128 entries"]),
    ("positions-unknown", lambda c: [{"layer_name": R, "op": "zero", "positions": "last"}], InvalidArgument,
     "interventions[0].positions", []),
    ("positions-empty", lambda c: [{"layer_name": R, "op": "zero", "positions": []}], InvalidArgument,
     "interventions[0].positions", []),
    ("vector-id-unknown", lambda c: [{"layer_name": R, "op": "add", "vector_id": "vec_nope"}], InvalidArgument,
     "interventions[0].vector_id", ["interventions[0]: no vector 'vec_nope'"]),
    ("patch-without-source", lambda c: [{"layer_name": R, "op": "patch"}], InvalidArgument,
     "interventions[0].source", ["needs a 'source'"]),
    ("patch-unknown-capture", lambda c: [_patch("cap_nope")], InvalidArgument, "interventions[0].source.capture_id",
     ["no capture 'cap_nope'"]),
    ("patch-unknown-hook", lambda c: [_patch(c["full"], "blocks.2.hook_resid_post")], InvalidArgument,
     "interventions[0].source.hook_id", ["no hook 'blocks.2.hook_resid_post'", "blocks.0.hook_resid_post"]),
    ("patch-other-layer", lambda c: [_patch(c["full"], "blocks.0.hook_resid_post")], InvalidArgument,
     "interventions[0].source.hook_id", ["residual of layer 0", "changes the residual of layer 1", "same site"]),
    ("patch-other-direction", lambda c: [_patch(c["full"], "blocks.1.hook_resid_pre")], InvalidArgument,
     "interventions[0].source.hook_id", ["residual input of layer 1", "changes the residual of layer 1"]),
    ("patch-other-component", lambda c: [{**_patch(c["full"], "blocks.1.hook_resid_post"),
                                          "layer_name": "blocks.1.hook_mlp_out"}], InvalidArgument,
     "interventions[0].source.hook_id", ["residual of layer 1", "mlp of layer 1"]),
    ("patch-other-model", lambda c: [{**_patch(c["gpt2"], "blocks.1.mlp.hook_post"),
                                      "layer_name": "blocks.1.mlp.hook_post"}], InvalidArgument,
     "interventions[0].source", ["[256] per token", "[128]", "another model"]),
    ("patch-missing-positions", lambda c: [_patch(c["prompt_only"], positions=[1, c["P"] + 1])], InvalidArgument,
     "interventions[0].positions", [lambda c: f"holds positions 0-{c['P'] - 1}", lambda c: f"not {c['P'] + 1}"]),
    ("patch-no-generated-positions", lambda c: [_patch(c["prompt_only"], positions="generated")], InvalidArgument,
     "interventions[0].positions", ["no generated positions"]),
    ("second-one-named", lambda c: [{"layer_name": R, "op": "zero"},
                                    {"layer_name": "blocks.0.attn.hook_k", "op": "zero", "heads": [3]}],
     InvalidArgument, "interventions[1].heads", ["interventions[1]", "head 3"]),
]


@pytest.mark.parametrize("make,exc,arg,needles", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_interventions_are_refused(error_context, make, exc, arg, needles):
    c = error_context
    with pytest.raises(exc) as info:
        plan(c["lm"], prompt=c["prompt"], sampling=greedy(), interventions=make(c), sources=c["sources"],
             vectors=c["store"])
    assert info.value.arg == arg, info.value.message
    for needle in needles:
        needle = needle(c) if callable(needle) else needle
        assert needle in info.value.message, (needle, info.value.message)


def test_vector_id_without_a_store_is_refused(error_context):
    c = error_context
    with pytest.raises(InvalidArgument) as info:
        plan(c["lm"], prompt=c["prompt"], interventions=[{"layer_name": R, "op": "add", "vector_id": "v"}])
    assert info.value.arg == "interventions[0].vector_id" and "no stored vectors" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        plan(c["lm"], prompt=c["prompt"], interventions=[_patch(c["full"])])
    assert info.value.arg == "interventions[0].source" and "no captures" in info.value.message


# --------------------------------------------------------------------------------------------
# The real model (slow)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(default_model, default_model_path) -> Setup:
    """SmolLM2-135M on a short text prompt (a chat prompt's system message would triple every
    reference step) whose continuation is open enough for one layer's edit to change it; the
    corrupted prompt changes one word."""
    lm = default_model
    layer, last = 14, lm.info.n_layers - 1
    hooks = [t.format(layer) for t in SITES] + [f"blocks.{layer + 1}.attn.hook_pattern", f"blocks.{last}.attn.hook_k",
                                                f"blocks.{last}.hook_resid_post"]
    prompt = lm.text_prompt("Once upon a time, there was a little")
    corrupt = lm.text_prompt("Once upon a time, there was a big")
    return make_setup("llama", lm, default_model_path, layer, prompt, corrupt,
                      [{"layer_name": h} for h in dict.fromkeys(hooks)])


REAL_ALL_OPS = ("blocks.{}.hook_resid_post", "blocks.{}.attn.hook_k", "blocks.{}.mlp.hook_post")
REAL_CASES = [(t, op) for t in REAL_ALL_OPS for op in OPS] + [
    (t, OPS[i % len(OPS)]) for i, t in enumerate(SITES) if t not in REAL_ALL_OPS]
REAL_CHANGED: dict[tuple[str, str], bool] = {}


@pytest.mark.slow
@pytest.mark.parametrize("template,op", REAL_CASES)
def test_real_model_intervention_equals_transformers(real, template, op):
    """SmolLM2-135M: every op on the residual stream, keys (the KV cache) and MLP neurons, and one op
    on every other site."""
    REAL_CHANGED[template, op] = check_case(real, template, op, SITES.index(template) * len(OPS) + OPS.index(op))


@pytest.mark.slow
def test_real_model_interventions_change_the_generation(real):
    if len(REAL_CHANGED) < len(REAL_CASES):
        pytest.skip("needs every case of test_real_model_intervention_equals_transformers in this run")
    changed = sum(REAL_CHANGED.values())
    assert changed >= 0.75 * len(REAL_CHANGED), f"only {changed} of {len(REAL_CHANGED)}: {REAL_CHANGED}"


@pytest.mark.slow
def test_real_model_identity_interventions_leave_logits_bit_identical(real):
    s = real
    info = s.lm.info
    specs = [{"layer_name": t.format(i), "op": "scale", "coefficient": 1.0} for t in SITES for i in (0, 14, 29)]
    specs = list({sp["layer_name"]: sp for sp in specs}.values())
    specs += [{"layer_name": "blocks.14.attn.hook_k", "op": "add", "vector": [0.0] * info.d_head},
              {"layer_name": "blocks.14.hook_resid_post", "op": "patch",
               "source": {"capture_id": s.clean.capture.capture_id, "hook_id": "blocks.14.hook_resid_post"}}]
    resolved = resolve_interventions(s.lm, intervention_specs(specs), len(s.prompt),
                                     sources=sources_from(s.clean.capture))
    plain = stepwise_logits(s.lm, s.prompt, 3)
    capture = Capture(s.lm, [], CaptureOptions(), resolved)
    with capture.installed(s.lm):
        edited = stepwise_logits(s.lm, s.prompt, 3, capture)
    assert all(sum(t) > 0 for t in capture.touched)
    assert all(np.array_equal(a, b) for a, b in zip(plain, edited))
