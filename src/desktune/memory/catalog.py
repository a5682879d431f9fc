"""Architecture numbers the memory planner needs, from a config.json or a built-in catalog of public configs."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktune.constants import EMBEDDED_ALIASES, EMBEDDED_CATALOG_NAME
from desktune.errors import DesktuneError

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTN_LINEARS + MLP_LINEARS


@dataclass(frozen=True)
class ArchSpec:
    """The shape of a decoder-only transformer (Llama / Mistral / Qwen2 / Gemma2 / Phi-3 family).

    `family` selects per-family details: gemma2 has four norms per layer and soft-capped logits, phi3 fuses
    q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. Sizes are counts, not bytes.
    """

    name: str
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.family == "gemma2" else 2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by its module name."""
        h, i = self.hidden, self.intermediate
        if self.family == "phi3":
            return {"qkv_proj": (h, self.q_dim + 2 * self.kv_dim), "o_proj": (self.q_dim, h),
                    "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        """Weights of the linear layers of one decoder layer (biases excluded)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    def layer_other_params(self) -> int:
        """Norm weights and q/k/v biases of one decoder layer."""
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return self.norms_per_layer * self.hidden + bias

    def embedding_params(self) -> int:
        """Input embedding plus the output head when it is not tied to it."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def n_params(self) -> int:
        """Total parameters (tied weights once), as the model's `num_parameters()` reports them."""
        per_layer = self.layer_linear_params() + self.layer_other_params()
        return self.layers * per_layer + self.embedding_params() + self.hidden  # + final norm


def _spec(name: str, family: str, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int,
          vocab: int, tied: bool, **kw: Any) -> ArchSpec:
    return ArchSpec(name=name, family=family, hidden=hidden, intermediate=inter, layers=layers, heads=heads,
                    kv_heads=kv, head_dim=head_dim, vocab=vocab, tied_embeddings=tied, **kw)


_QWEN = {"qkv_bias": True}
_GEMMA2 = {"final_logit_softcap": 30.0, "attn_logit_softcap": 50.0}

# Public config.json numbers of each model (hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, head_dim, vocab_size, tie_word_embeddings).
CATALOG: dict[str, ArchSpec] = {s.name: s for s in (
    _spec("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128, 128256, False),
    _spec("llama-3.1-70b", "llama", 8192, 28672, 80, 64, 8, 128, 128256, False),
    _spec("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 64, 128256, True),
    _spec("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128, 128256, True),
    _spec("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 128, 32768, False),  # v0.3 (v0.1/v0.2: 32000)
    _spec("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 64, 151936, True, **_QWEN),
    _spec("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, **_QWEN),
    _spec("qwen2.5-3b", "qwen2", 2048, 11008, 36, 16, 2, 128, 151936, True, **_QWEN),
    _spec("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, **_QWEN),
    _spec("qwen2.5-14b", "qwen2", 5120, 13824, 48, 40, 8, 128, 152064, False, **_QWEN),
    _spec("qwen2.5-32b", "qwen2", 5120, 27648, 64, 40, 8, 128, 152064, False, **_QWEN),
    _spec("qwen2.5-72b", "qwen2", 8192, 29568, 80, 64, 8, 128, 152064, False, **_QWEN),
    _spec("gemma-2-2b", "gemma2", 2304, 9216, 26, 8, 4, 256, 256000, True, **_GEMMA2),
    _spec("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256, 256000, True, **_GEMMA2),
    _spec("phi-3-mini", "phi3", 3072, 8192, 32, 32, 32, 96, 32064, False),  # Phi-3-mini-4k-instruct
    _spec("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 64, 49152, True),
    _spec("smollm2-360m", "llama", 960, 2560, 32, 15, 5, 64, 49152, True),
    _spec("smollm2-1.7b", "llama", 2048, 8192, 24, 32, 32, 64, 49152, True),
)}
ALIASES = {
    **{alias: EMBEDDED_CATALOG_NAME for alias in sorted(EMBEDDED_ALIASES - {EMBEDDED_CATALOG_NAME})},
    "llama-3-8b": "llama-3.1-8b", "llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistral-7b-v0.3": "mistral-7b", "phi-3-mini-4k": "phi-3-mini", "phi-3-mini-4k-instruct": "phi-3-mini",
}

_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma2": "gemma2", "phi3": "phi3",
             "qwen3": "llama", "gemma": "gemma2", "mixtral": "mistral"}


def arch_from_config(cfg: dict[str, Any], name: str = "config.json") -> ArchSpec:
    """An ArchSpec from the fields of a Hugging Face config.json (text_config of multimodal configs)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise DesktuneError(f"config.json lacks {', '.join(missing)} (not a decoder-only language model?)",
                            where=name, fix="use a causal LM's config.json or a catalog name (desktune plan --list)")
    model_type = str(cfg.get("model_type", "llama"))
    family = _FAMILIES.get(model_type, "llama")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    return ArchSpec(
        name=name, family=family, hidden=hidden,
        intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
        layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        vocab=int(cfg["vocab_size"]), tied_embeddings=bool(cfg.get("tie_word_embeddings", family != "llama")),
        qkv_bias=bool(cfg.get("attention_bias", model_type in ("qwen2",))),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DesktuneError(f"cannot read config.json ({e})", where=str(path),
                            fix="pass a model folder with a valid config.json") from e


def cached_hub_config(repo_id: str) -> Path | None:
    """config.json of a hub id already in the local Hugging Face cache (never downloads)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except (ImportError, ValueError):  # no huggingface_hub, or an invalid repo id (HFValidationError)
        return None
    return Path(found) if isinstance(found, str) else None


def resolve_arch(name_or_path: str | Path) -> ArchSpec:
    """An ArchSpec from a catalog short name, a model folder holding config.json, a config.json path, or a hub
    id whose config.json is in the local Hugging Face cache."""
    text = str(name_or_path)
    key = text.strip().lower()
    key = ALIASES.get(key, key)
    if key in CATALOG:
        return CATALOG[key]
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return arch_from_config(_read_config(path / "config.json"), name=path.name or text)
    if path.is_file() and path.suffix == ".json":
        return arch_from_config(_read_config(path), name=path.parent.name or path.name)
    cached = cached_hub_config(text)
    if cached is not None:
        return arch_from_config(_read_config(cached), name=text)
    tail = key.rsplit("/", 1)[-1]  # a hub id: match its model part
    close = difflib.get_close_matches(tail, [*CATALOG, *ALIASES], n=4, cutoff=0.5)
    names = list(dict.fromkeys(ALIASES.get(c, c) for c in close))[:3]
    hint = f"did you mean {', '.join(repr(n) for n in names)}? " if names else ""
    raise DesktuneError(
        f"unknown model '{text}' (not a catalog name, a model folder with config.json, or a config.json)",
        where="model", fix=f"{hint}catalog names: {', '.join(CATALOG)}",
    )
