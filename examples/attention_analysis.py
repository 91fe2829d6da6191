"""Attention analysis: which earlier word does "she" attend to in
"John gave Mary the book because she asked for it"?

Captures the attention pattern (and attention output) of every layer for the prompt and,
per layer, reports for each head the earlier token of the sentence that "she" attends to
most, then a summary across heads (John vs Mary).

    python examples/attention_analysis.py --base-url http://127.0.0.1:8080
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from _common import find_span, parser

from bridge import LMStudioNeuroScopeClient, NeuroScopeActivationBridge, to_neuroscope

SENTENCE = "John gave Mary the book because she asked for it"


def words_of_tokens(tokens: list[str], s0: int, s1: int, sentence: str) -> dict[int, tuple[int, str]]:
    """Token position -> (word index, word) for the sentence's tokens [s0, s1): the word
    holding the token's first non-space character (a token of spaces goes to the next word)."""
    words, at = [], 0
    for i, w in enumerate(sentence.split()):
        lo = sentence.index(w, at)
        words.append((lo, lo + len(w), i, w))
        at = lo + len(w)
    joined = "".join(tokens)
    token_start = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens) + 1)]
    base = joined.rfind(sentence, 0, token_start[s1])  # where the sentence starts in the text
    out = {}
    for k in range(s0, s1):
        text = tokens[k]
        c = token_start[k] - base + (len(text) - len(text.lstrip()))
        word = next((w for w in words if c < w[1]), words[-1])  # words are in order
        out[k] = (word[2], word[3])
    return out


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--sentence", default=SENTENCE)
    p.add_argument("--word", default="she", help="the token whose attention is examined")
    p.add_argument("--layers", type=int, nargs="*", help="target layers (default: all)")
    p.add_argument("--per-head", action="store_true", help="also print each head's most-attended word")
    args = p.parse_args()

    client = LMStudioNeuroScopeClient(args.base_url, api_key=args.api_key)
    n_layers = client.hook_points()["n_layers"]
    bridge = NeuroScopeActivationBridge(client)
    hooks = bridge.create_attention_analysis_hooks(n_layers, args.layers)
    # One generated token is enough: the prompt's patterns are complete after the prefill.
    result = client.generate_with_activations(args.sentence, hooks, max_tokens=1, temperature=0.0)
    ns = to_neuroscope(result)
    tokens = ns["tokens"]

    s0, s1 = find_span(tokens, args.sentence)
    w0, w1 = find_span(tokens, " " + args.word, s0)
    q = w1 - 1  # the (last) token of the word
    word_of = words_of_tokens(tokens, s0, s1, args.sentence)  # token position -> word
    print(f"sentence: {s1 - s0} tokens at positions {s0}..{s1 - 1}; query {args.word!r} = position {q} {tokens[q]!r}")

    votes: Counter = Counter()
    heads = 0
    for layer_key, comps in ns["layers"].items():
        t = comps["attention_pattern"]
        pat = t["data"][:, t["positions"].index(q), :]  # [heads, keys]: the query's row
        if not np.allclose(pat.sum(axis=-1), 1.0, atol=1e-4):
            print(f"{layer_key}: pattern rows do not sum to 1")
            return 1
        # attention per earlier word of the sentence (summed over its tokens), per head
        words = sorted({word_of[k] for k in range(s0, w0)}, key=lambda w: w[0])
        per_word = np.stack([pat[:, [k for k in range(s0, w0) if word_of[k] == w]].sum(axis=1) for w in words], 1)
        best = [words[i][1] for i in np.argmax(per_word, axis=1)]
        heads += len(best)
        votes.update(best)
        top, count = Counter(best).most_common(1)[0]
        weights = {w[1]: float(per_word[:, i].mean()) for i, w in enumerate(words)}
        if args.per_head:
            print(f"{layer_key:>18}: most-attended earlier word per head: {best}")
        print(f"{layer_key:>18}: majority {top!r} ({count}/{len(best)} heads) | mean weight "
              f"John {weights.get('John', 0):.3f} Mary {weights.get('Mary', 0):.3f}")
    print(f"summary over {heads} heads: " + ", ".join(f"{k!r} {v}" for k, v in votes.most_common(6)))
    print(f"{args.word} -> Mary: {votes.get('Mary', 0)} heads, John: {votes.get('John', 0)} heads")
    print("ATTENTION ANALYSIS OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
