"""Basic capture: generate a reply and capture the residual stream of a few layers.

    python examples/basic_capture.py --base-url http://127.0.0.1:8080
"""

from __future__ import annotations

import numpy as np
from _common import parser

from bridge import LMStudioNeuroScopeClient, to_neuroscope


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=12)
    args = p.parse_args()

    client = LMStudioNeuroScopeClient(args.base_url, api_key=args.api_key)
    health = client.health()
    model = client.list_models()[0]
    n = model["n_layers"]
    print(f"server: {health['status']}, model {model['id']} ({n} layers, d_model {model['d_model']})")

    layers = sorted({0, n // 2, n - 1})
    hooks = [{"layer_name": f"transformer.h.{i}", "component": "residual"} for i in layers]
    result = client.generate_with_activations([{"role": "user", "content": args.prompt}], hooks,
                                              max_tokens=args.max_tokens, temperature=0.0)
    print(f"reply: {result.text!r}")
    print(f"tokens: {len(result['tokens'])} ({result['usage']['prompt_tokens']} prompt)")
    for hook_id, entries in result["activations"].items():
        e0 = entries[0]
        print(f"  {hook_id}: {len(entries)} steps, prompt step shape {e0['shape']}, dtype {e0['dtype']}")

    ns = to_neuroscope(result)
    for i in layers:
        t = ns["layers"][f"transformer.h.{i}"]["residual"]
        norms = np.linalg.norm(t["data"][0], axis=-1)
        print(f"  layer {i:2d} residual {t['shape']}: mean |x| {norms.mean():.2f}, "
              f"last token {t['tokens'][-1]!r} |x| {norms[-1]:.2f}")
    print("BASIC CAPTURE OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
