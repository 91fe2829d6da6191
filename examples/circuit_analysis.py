"""Circuit analysis: residual, attention and MLP outputs on every layer, through shared memory.

For the last prompt token it prints how much each layer's attention and MLP write into the
residual stream (their output norms) and how the residual grows, then optionally saves the
capture for offline analysis.

    python examples/circuit_analysis.py --base-url http://127.0.0.1:8080 [--export run.arrow]
"""

from __future__ import annotations

import numpy as np
from _common import parser

from bridge import LMStudioNeuroScopeClient, NeuroScopeActivationBridge, load_any, save_capture, to_neuroscope


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--transport", choices=["shm", "inline"], default="shm")
    p.add_argument("--export", help="save the capture here (.arrow or .safetensors) and read it back")
    args = p.parse_args()

    client = LMStudioNeuroScopeClient(args.base_url, api_key=args.api_key)
    n_layers = client.hook_points()["n_layers"]
    bridge = NeuroScopeActivationBridge(client)
    hooks = bridge.create_hook_specs_for_circuit_analysis(n_layers, ["residual", "attention", "mlp"])
    print(f"{len(hooks)} hooks on {n_layers} layers, transport {args.transport}")

    capture = client.generate_with_activations(args.prompt, hooks, max_tokens=args.max_tokens,
                                               temperature=0.0, transport=args.transport)
    try:
        if args.transport == "shm":
            print(f"capture {capture.capture_id} mapped zero-copy: {capture.zero_copy}")
        ns = to_neuroscope(capture)  # copies out of shared memory
        if args.export:
            save_capture(capture, args.export)
    finally:
        if args.transport == "shm":
            capture.close()  # unmap and release the segment on the server
    print(f"reply: {capture.text!r}")

    q = ns["prompt_tokens"] - 1  # the last prompt token: where the first reply token is predicted
    print(f"contributions at position {q} ({ns['tokens'][q]!r}):")
    print("layer  |attn|   |mlp|   |resid|")
    for i in range(n_layers):
        comps = ns["layers"][f"transformer.h.{i}"]
        a, m, r = (float(np.linalg.norm(comps[c]["data"][0, q])) for c in ("attention", "mlp", "residual"))
        print(f"{i:5d} {a:7.2f} {m:7.2f} {r:8.2f}")
    top = max(range(n_layers), key=lambda i: float(np.linalg.norm(ns["layers"][f"transformer.h.{i}"]["mlp"]["data"][0, q])))
    print(f"largest MLP write: layer {top}")
    if args.export:
        back = load_any(args.export)
        same = all(np.array_equal(t["data"], back["layers"][layer][comp]["data"])
                   for layer, comps in ns["layers"].items() for comp, t in comps.items())
        print(f"exported to {args.export}; read back identical: {same}")
        if not same:
            return 1
    print("CIRCUIT ANALYSIS OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
