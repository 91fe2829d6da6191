"""Streaming with activations: text deltas and each step's activations as they arrive.

    python examples/streaming.py --base-url http://127.0.0.1:8080
"""

from __future__ import annotations

import sys

import numpy as np
from _common import parser

from bridge import LMStudioNeuroScopeClient, to_neuroscope


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--prompt", default="Write one sentence about the sea.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--layer", type=int, default=None, help="layer to capture (default: the middle one)")
    args = p.parse_args()

    client = LMStudioNeuroScopeClient(args.base_url, api_key=args.api_key)
    n_layers = client.hook_points()["n_layers"]
    layer = n_layers // 2 if args.layer is None else args.layer
    hooks = [{"layer_name": f"transformer.h.{layer}", "component": "residual", "hook_id": "resid"},
             {"layer_name": f"transformer.h.{layer}", "component": "attention_pattern", "hook_id": "pattern"}]

    stream = client.generate_with_activations(args.prompt, hooks, max_tokens=args.max_tokens,
                                              temperature=0.0, stream=True)
    events = 0
    log = []
    print("reply: ", end="", flush=True)
    for event in stream:
        events += 1
        if event.text:
            print(event.text, end="", flush=True)
        for entry in event.activations.get("resid", []):
            log.append((entry["step"], entry["shape"], entry["positions"]))
    print()
    shown = log if len(log) <= 4 else log[:3] + [None] + log[-1:]
    for item in shown:
        if item is None:
            print("  ...")
        else:
            step, shape, pos = item
            print(f"  step {step}: residual {shape} positions {pos}")
    print(f"{events} events, {len(log)} steps of activations, finish_reason {stream.finish_reason}")

    result = stream.result()  # the same shape as a non-streamed inline answer
    ns = to_neuroscope(result)
    resid = ns["layers"][f"transformer.h.{layer}"]["residual"]
    pattern = ns["layers"][f"transformer.h.{layer}"]["attention_pattern"]
    print(f"assembled: residual {resid['shape']}, attention pattern {pattern['shape']}, "
          f"{len(ns['tokens'])} tokens")
    ok = resid["shape"][1] == len(ns["tokens"]) == pattern["shape"][1] == pattern["shape"][2]
    ok = ok and np.allclose(pattern["data"].sum(axis=-1), 1.0, atol=1e-4)
    if not ok:
        print("the streamed steps do not assemble into the full sequence", file=sys.stderr)
        return 1
    print("STREAMING OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
