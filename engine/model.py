"""Loading a model (mlx-lm folder, Hugging Face repo id, or GGUF file) and describing it."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import engine  # noqa: F401  (loads OpenBLAS before mlx.core)
from engine import paths
from engine.architectures import Architecture, discover, linear_in_features, model_arg
from engine.errors import InvalidArgument, ModelLoadError, ModelNotFound, UnsupportedArchitecture
from engine.progress import Progress

log = logging.getLogger("nsbridge.engine")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Used when a model's tokenizer carries no chat template (e.g. base models, tiny test models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str  # mlx-lm model_type, e.g. "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    context_length: int
    dtype: str  # the compute dtype (of a quantized model: its scales')
    source: str
    quantization: dict | None = None  # {"bits", "group_size"} of a quantized model
    n_experts: int = 0  # experts per mixture-of-experts layer (the router's logits); 0: no router

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def dims(self) -> dict[str, int]:
        """The sizes `vocabulary.per_token_shape` reads."""
        return {"d_model": self.d_model, "d_head": self.d_head, "d_mlp": self.d_mlp, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "n_experts": self.n_experts}


@dataclass
class LoadedModel:
    model: Any  # mlx_lm model (nn.Module)
    tokenizer: Any  # mlx_lm TokenizerWrapper
    info: ModelInfo
    arch: Architecture

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` (valid ones: {role, content: str}, see engine.plan) rendered with
        the chat template, ending with the assistant's turn."""
        tok = self.tokenizer
        template = getattr(tok, "chat_template", None)
        kwargs = {} if template else {"chat_template": FALLBACK_CHAT_TEMPLATE}
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return tok.encode(text, add_special_tokens=False)

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of raw text, with the tokenizer's BOS handling as mlx-lm's generate does: its
        special tokens are added unless the text already starts with the BOS token."""
        tok = self.tokenizer
        add_special = tok.bos_token is None or not text.startswith(tok.bos_token)
        return tok.encode(text, add_special_tokens=add_special)

    def detokenizer(self):
        """A fresh streaming detokenizer (engine.detokenize) for one completion."""
        detok = copy.copy(self._detokenizer)
        detok.reset()
        return detok

    @functools.cached_property
    def _detokenizer(self):
        from engine.detokenize import streaming_detokenizer

        return streaming_detokenizer(self.tokenizer)


def _gguf_folder(path: Path, progress: Progress | None) -> Path:
    from engine.gguf import convert_gguf

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = paths.models_dir() / f"{path.stem}-{key}-f32"
    if not (out / "config.json").exists():
        log.info("converting %s to a float32 mlx-lm folder in %s", path.name, out)
        convert_gguf(path, out, progress=progress or Progress("converting " + path.name))
    return out


def resolve_model_path(model_path: str, progress: Progress | None = None) -> tuple[str, bool]:
    """Turn what a client sent into something mlx_lm.load accepts; returns (path_or_repo, is_local)."""
    if not isinstance(model_path, str) or not model_path.strip():
        raise InvalidArgument("model_path must be a non-empty string", "model_path")
    p = Path(model_path).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return str(_gguf_folder(p, progress)), True
        raise ModelLoadError(f"{model_path} is a file but not a GGUF model; give a model folder or a .gguf file",
                             "model_path")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{model_path} is not a model folder: it has no config.json", "model_path")
        return str(p), True
    if _REPO_ID.match(model_path) and not model_path.startswith((".", "/", "~")):
        return model_path, False
    raise ModelNotFound(f"model path {model_path!r} does not exist", "model_path")


def load_model(model_path: str, model_id: str | None = None, progress: Progress | None = None) -> LoadedModel:
    import mlx.core as mx
    import mlx_lm

    target, is_local = resolve_model_path(model_path, progress)
    t0 = time.perf_counter()
    try:
        model, tokenizer = mlx_lm.load(target, model_config=_config_fixes(target) if is_local else None)
    except (FileNotFoundError, OSError) as exc:
        kind = ModelLoadError if is_local else ModelNotFound
        raise kind(f"cannot load {model_path!r}: {exc}", "model_path") from exc
    except Exception as exc:  # mlx-lm raises ValueError for unknown model types, etc.
        raise ModelLoadError(f"cannot load {model_path!r}: {exc}", "model_path") from exc

    model_type = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", "?")
    try:
        arch = discover(model, model_type)
    except LookupError as exc:
        raise UnsupportedArchitecture(f"architecture {model_type!r} is not supported for activation capture: "
                                      f"{exc}", "model_path") from exc
    info = describe(model, arch, model_id or default_model_id(model_path), str(model_path))
    mx.eval(model.parameters())
    log.info(
        "loaded %s (%s, %d layers, d_model %d, %d heads / %d kv heads, %s%s) in %.1fs",
        info.model_id, model_type, info.n_layers, info.d_model, info.n_heads, info.n_kv_heads, info.dtype,
        f", {info.quantization['bits']}-bit" if info.quantization else "", time.perf_counter() - t0,
    )
    lm = LoadedModel(model=model, tokenizer=tokenizer, info=info, arch=arch)
    lm.detokenizer()  # built once now (it reads the whole vocabulary), not on the first request
    return lm


def describe(model: Any, arch: Architecture, model_id: str, source: str) -> ModelInfo:
    """The model's facts, from its arguments and, where those differ between model files, its modules."""
    args = model.args
    blocks = arch.blocks(model)
    attn = arch.module(model, "attn", 0) if arch.attn else None  # a dotted path where attention is nested
    embed = arch.embedding(model)
    d_model = int(model_arg(args, "d_model"))
    n_heads = int(model_arg(args, "n_heads"))
    mlp_out = arch.module(model, "mlp_post", 0) if arch.has("mlp_post") else None
    router = arch.module(model, "router", arch.router_layers[0]) if arch.router_layers else None
    return ModelInfo(
        model_id=model_id,
        architecture=arch.name,
        n_layers=len(blocks),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(_attn_count(attn) or model_arg(args, "n_kv_heads", n_heads)),
        d_head=int(getattr(attn, "head_dim", None) or model_arg(args, "head_dim", d_model // n_heads)),
        d_mlp=linear_in_features(mlp_out) if mlp_out is not None else 0,
        vocab_size=int(embed.weight.shape[0]),
        context_length=int(model_arg(args, "context", 4096)),
        dtype=compute_dtype(model),
        quantization=quantization(model),
        source=source,
        n_experts=int(router.weight.shape[0]) if router is not None else 0,
    )


def _attn_count(attn: Any) -> int | None:
    """The attention module's own key/value head count: some configs nest it (dbrx's attn_config)."""
    return next((v for n in ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
                 if (v := getattr(attn, n, None)) is not None), None)


def quantization(model: Any) -> dict | None:
    """How the model's quantized layers are quantized (a list where they differ: mixed recipes),
    or None. Read from the modules, so a float embedding beside quantized layers still counts."""
    layers = [m for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")]
    if not layers:
        return None

    def one(values: set):
        return values.pop() if len(values) == 1 else sorted(values)

    return {"bits": one({int(m.bits) for m in layers}), "group_size": one({int(m.group_size) for m in layers}),
            "mode": one({getattr(m, "mode", "affine") for m in layers})}


def compute_dtype(model: Any) -> str:
    """The most common floating dtype among the parameters: the compute dtype, also of a quantized
    model (whose weights are packed integers and whose microscaling scales are uint8 exponents)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    counts = Counter(str(v.dtype) for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    return counts.most_common(1)[0][0].removeprefix("mlx.core.") if counts else "float32"


def _config_fixes(folder: str) -> dict:
    """Config keys mlx-lm would miss. transformers 5 writes `rope_theta` only inside
    `rope_parameters`; mlx-lm reads the top-level key and otherwise uses its own default
    (1e6 for Qwen), which would silently change every rotary embedding."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {folder}/config.json: {exc}", "model_path") from exc
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        return {"rope_theta": rope["rope_theta"]}
    return {}


def default_model_id(model_path: str) -> str:
    name = Path(model_path.rstrip("/")).name or model_path
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"
