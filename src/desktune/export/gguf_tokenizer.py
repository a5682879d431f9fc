"""The tokenizer part of a GGUF file: the whole vocabulary, merges, pre-tokenizer type, special ids, chat template.

llama.cpp re-implements each pre-tokenizer (the regex split before BPE) and names it in `tokenizer.ggml.pre`. Its
converter finds the name by tokenizing a fixed text and hashing the token ids; desktune does the same with the
same text and refuses a tokenizer whose hash it does not know, rather than guess a pre-tokenizer that would
tokenize differently from training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

import gguf

from desktune.errors import DesktuneError

# The text llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre) tokenizes to tell pre-tokenizers apart.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple"
    " emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728"
    "apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b"
    "\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you"
    " sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp's pre-tokenizer name, for the tokenizers of the families
# desktune writes (llama and qwen2 architectures); taken from llama.cpp's list, which names the model each hash
# was computed on.
PRE_BY_HASH: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B (3.x)
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3's tokenizer
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3 (llama arch)
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2's own
}

_MARK = "desktune-end-of-turn-probe"


@dataclass
class TokenizerMeta:
    """What a GGUF carries about the tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DesktuneError("the tokenizer is a slow (Python) tokenizer without tokenizer.json",
                            where="tokenizer", fix="use a model folder with a tokenizer.json (a fast tokenizer)")
    return json.loads(backend.to_str())


def check_hash(tokenizer: Any) -> tuple[str, str]:
    """(hash, llama.cpp pre-tokenizer name) of the tokenizer; an unknown hash is refused."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_BY_HASH.get(digest)
    if pre is None:
        raise DesktuneError(
            f"llama.cpp would not know this tokenizer's pre-tokenizer (check hash {digest[:16]}...); writing a "
            "guessed one would tokenize differently from training",
            where="tokenizer",
            fix="export a model of a supported family (Llama 3, SmolLM/SmolLM2, Qwen2/2.5, Mistral-Nemo, "
                "DeepSeek), or convert with llama.cpp's own convert_hf_to_gguf.py once it lists this tokenizer",
        )
    return digest, pre


def _kind(spec: dict[str, Any]) -> str:
    """'bpe' (GPT-2 style byte-level BPE) or why the tokenizer cannot be written."""
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise DesktuneError(
            "SentencePiece-style tokenizers (Llama 2, Mistral 7B v0.1-v0.3: tokenizer.ggml.model 'llama') are not "
            "written by desktune yet: their token scores cannot be rebuilt exactly from tokenizer.json",
            where="tokenizer", fix="convert this model with llama.cpp's convert_hf_to_gguf.py (after desktune merge)")
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise DesktuneError(f"a {model.get('type', 'unknown')} tokenizer without byte-level BPE cannot be written",
                            where="tokenizer", fix="export a model with a GPT-2 style (byte-level BPE) tokenizer")
    return "bpe"


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token id below vocab_size with its GGUF token type (ids the tokenizer lacks are [PADn], unused)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise DesktuneError(f"the tokenizer has ids up to {max(reverse)}, past the model's vocab_size {vocab_size}",
                            where="tokenizer", fix="resize the model's embeddings to the tokenizer")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _merges(spec: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def end_of_turn_token(tokenizer: Any, template: str | None) -> str | None:
    """The special token the chat template closes an assistant turn with (None if it uses none)."""
    if not template:
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # any template failure (jinja errors, raise_exception): no end-of-turn token known
        return None
    if not isinstance(text, str) or _MARK not in text:
        return None
    rest = text[text.index(_MARK) + len(_MARK):].lstrip(" ")
    specials = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return next((s for s in specials if rest.startswith(s)), None)


def _special_ids(tokenizer: Any, template: str | None, notes: list[str]) -> dict[str, int]:
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    found = {k: int(v) for k, v in ids.items() if v is not None}
    eot = end_of_turn_token(tokenizer, template)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if eot_id != found.get("eos"):
            found["eot"] = int(eot_id)
            notes.append(f"end of turn: {eot!r} (id {eot_id}) besides eos {tokenizer.eos_token!r}")
        else:
            notes.append(f"end of turn = eos: {eot!r} (id {eot_id})")
    elif template:
        notes.append("the chat template ends turns with no special token: generation stops at eos only")
    return found


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS (what llama.cpp's add_bos_token / add_eos_token say)."""
    ids = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(bos is not None and ids[:1] == [bos]), bool(eos is not None and len(ids) > 1 and ids[-1] == eos)


def tokenizer_meta(tokenizer: Any, vocab_size: int, template: str | None) -> TokenizerMeta:
    """Everything the GGUF needs about the tokenizer, or a DesktuneError naming what cannot be written exactly."""
    spec = _tokenizer_json(tokenizer)
    _kind(spec)
    digest, pre = check_hash(tokenizer)
    tokens, types = vocabulary(tokenizer, vocab_size)
    notes = [f"tokenizer: gpt2 BPE, pre-tokenizer '{pre}' (check hash {digest[:12]})"]
    add_bos, add_eos = _adds(tokenizer)
    byte_level = next((p for p in _pre_tokenizers(spec) if p.get("type") == "ByteLevel"), {})
    meta = TokenizerMeta(pre=pre, tokens=tokens, token_types=types, merges=_merges(spec),
                         special_ids=_special_ids(tokenizer, template, notes), add_bos=add_bos, add_eos=add_eos,
                         add_space_prefix=byte_level.get("add_prefix_space"), chat_template=template, notes=notes)
    if template is None:
        notes.append("no chat template: the GGUF carries none (chat front ends will use their default)")
    return meta


def _pre_tokenizers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers") or [pre])


def write_tokenizer(writer: gguf.GGUFWriter, meta: TokenizerMeta) -> None:
    """Add the tokenizer keys to a GGUF writer."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    writer.add_token_merges(meta.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for name, token_id in meta.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.add_space_prefix is not None:
        writer.add_add_space_prefix(bool(meta.add_space_prefix))
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
