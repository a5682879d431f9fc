"""Merge a LoRA adapter into its 16-bit base and save a plain transformers model folder."""

from __future__ import annotations

from pathlib import Path

from desktune.adapters import check_adapter, load_adapter
from desktune.config import ModelConfig
from desktune.errors import DesktuneError
from desktune.hardware import DTYPES, Hardware, pick_device
from desktune.models.loading import load_model
from desktune.runs.atomic import write_folder_atomically
from desktune.runs.layout import ADAPTER_CONFIG, CHAT_TEMPLATE


def merge_adapter(adapter: str | Path, output: str | Path, *, model: str | None = None, dtype: str = "bf16",
                  device: str = "cpu") -> Path:
    """Load the base in 16-bit (never from quantized weights), merge the adapter, save safetensors + tokenizer."""
    adapter, output = Path(adapter), Path(output)
    if dtype not in DTYPES:
        raise DesktuneError(f"unknown dtype '{dtype}'", where="--dtype", fix="use bf16, fp16 or fp32")
    if output.exists() and not output.is_dir():
        raise DesktuneError("the output is a file, not a folder", where=str(output),
                            fix="choose a new folder with -o (nothing was written)")
    if output.exists() and any(output.iterdir()):
        raise DesktuneError("the output folder is not empty", where=str(output),
                            fix="choose a new folder (nothing was written)")
    parent = next(p for p in output.absolute().parents if p.exists())
    if not parent.is_dir():
        raise DesktuneError(f"cannot create the output folder: {parent} is a file", where=str(output),
                            fix="choose a folder in a writable place with -o (nothing was written)")
    trained_on = check_adapter(adapter).get("base_model_name_or_path")  # a bad adapter fails before the base loads
    base_name = model or trained_on
    if not base_name:
        raise DesktuneError("the adapter does not name its base model", where=str(adapter / ADAPTER_CONFIG),
                            fix="pass the base with --model")
    hw = Hardware(device=pick_device(device), dtype=DTYPES[dtype])
    loaded = load_model(ModelConfig(name=base_name), hw, quant="none")
    peft_model = load_adapter(loaded.model, adapter)
    merged = peft_model.merge_and_unload(safe_merge=True)
    template = adapter / CHAT_TEMPLATE
    if template.is_file():
        loaded.tokenizer.chat_template = template.read_text(encoding="utf-8")

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        loaded.tokenizer.save_pretrained(folder)

    try:  # on failure the temporary folder is removed: `output` is left as it was (absent or empty)
        return write_folder_atomically(output, write)
    except OSError as e:
        raise DesktuneError(f"cannot write the merged model ({e.strerror or e})", where=str(output),
                            fix="choose a writable folder with free space with -o") from e
