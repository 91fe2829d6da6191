"""The engine in-process, no server: register a hook, generate, read the activations.

    python examples/engine_api.py
"""

from __future__ import annotations

import numpy as np
from _common import ROOT  # noqa: F401  (puts the checkout on the import path)

import engine


def main() -> int:
    model = engine.load("default")  # SmolLM2-135M-Instruct, fetched and converted on first use
    print(model)

    hook = model.register_activation_hook(layer_name="transformer.h.5", component="residual")
    out = model.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                         max_tokens=12, temperature=0)
    print(f"reply: {out.text!r} ({out.finish_reason}, {out.prompt_tokens} prompt + "
          f"{out.completion_tokens} generated tokens)")

    resid = out.activations[hook]  # [positions, d_model]: the prompt, then every generated token
    print(f"{hook}: shape {resid.shape}, {resid.dtype}")
    norms = np.linalg.norm(resid, axis=-1)
    print(f"residual norm: first token {norms[0]:.1f}, last token {norms[-1]:.1f}, mean {norms.mean():.1f}")

    print("streamed: ", end="")
    for event in model.stream(prompt="Once upon a time", max_tokens=12, temperature=0, hooks=None):
        print(event.text, end="", flush=True)
    print()
    model.unregister_activation_hook(hook)
    print("ENGINE API OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
