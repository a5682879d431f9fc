"""`desktune export gguf`: a run, an adapter or a model folder as one GGUF file for llama.cpp, Ollama, LM Studio.

The base is loaded in 16 bit or more (never from quantized weights), the adapter merged in, and the file written
with the `gguf` package alone (no llama.cpp build): tensors streamed one at a time into a temporary file that is
fsynced and renamed (with its Modelfile), so the output name only ever holds a complete file. `--adapter-only`
writes the LoRA adapter as a GGUF adapter (gguf_adapter.py). What cannot be written exactly is refused before
anything is written.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch

from desktune.errors import DesktuneError
from desktune.export.gguf_adapter import adapter_tokenizer_meta, adapter_writer
from desktune.export.gguf_arch import (
    QTYPES,
    Arch,
    PlannedTensor,
    arch_of,
    gguf_name,
    heads_to_permute,
    llama3_rope_factors,
    permute_rows,
    rope_parameters,
    stream_tensors,
    tensor_type,
    write_hparams,
)
from desktune.export.gguf_tokenizer import TokenizerMeta, tokenizer_meta, write_tokenizer
from desktune.export.ollama import Modelfile, build_modelfile, gguf_template, modelfile_path, relative
from desktune.runs.atomic import fsync_path
from desktune.runs.layout import ADAPTER_CONFIG, CHECKPOINTS, RunDir

MODEL_TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")


@dataclass
class ExportResult:
    """What an export wrote."""

    path: Path
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    modelfile: Path | None = None


def resolve_source(source: Path) -> tuple[str, Path]:
    """('adapter', folder) for a run (its final adapter) or an adapter folder; ('model', folder) for a model."""
    run = RunDir(source)
    if (run.adapter / ADAPTER_CONFIG).is_file():
        return "adapter", run.adapter
    if (source / ADAPTER_CONFIG).is_file():
        return "adapter", source
    if run.config.is_file() or run.metrics.is_file():
        raise DesktuneError("the run has no final adapter (did training finish?)", where=str(source),
                            fix=f"pass one of its {CHECKPOINTS}/step-N folders, or finish the run with --resume")
    if (source / "config.json").is_file():
        return "model", source
    raise DesktuneError("not a run folder, an adapter folder nor a model folder", where=str(source),
                        fix=f"pass a run folder, a folder with {ADAPTER_CONFIG}, or a model folder with config.json")


@dataclass(frozen=True)
class OutputFile:
    """A file an export writes: where, what to call it in a message, and the function that fills a path."""

    path: Path
    what: str
    write: Callable[[Path], None]


def _cannot_write(f: OutputFile, e: OSError, done: list[Path] | None = None) -> DesktuneError:
    """One message for a failed write of `f`; `done`: the outputs already renamed into place."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = ("free space on that disk, or choose --out on a disk with room" if full
           else "choose a writable place for --out")
    written = f"only {', '.join(map(str, done))} was written" if done else "nothing was written"
    return DesktuneError(f"cannot write {f.what} ({e.strerror or e})", where=str(f.path), fix=f"{fix} ({written})")


def _temp_beside(f: OutputFile) -> Path:
    """An empty temporary sibling of `f`'s path (its name starts with '.')."""
    try:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{f.path.name}-", suffix=".tmp", dir=f.path.parent)
        os.close(fd)
    except OSError as e:
        raise _cannot_write(f, e) from e
    return Path(name)


def write_files_atomically(files: list[OutputFile]) -> None:
    """Write every file to a temporary sibling and fsync it, then rename them all into place: a full disk (or a
    kill) while writing any of them leaves every output name as it was, never a partial file under it."""
    temps: list[Path] = []
    try:
        for f in files:
            temps.append(_temp_beside(f))
            try:
                f.write(temps[-1])
                fsync_path(temps[-1])
            except OSError as e:
                raise _cannot_write(f, e) from e
        for i, (f, tmp) in enumerate(zip(files, temps, strict=True)):
            try:
                os.replace(tmp, f.path)
                fsync_path(f.path.parent)
            except OSError as e:
                raise _cannot_write(f, e, [g.path for g in files[:i]]) from e
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _weight(tensor: torch.Tensor, heads: int | None) -> Callable[[], torch.Tensor]:
    return lambda: permute_rows(tensor, heads) if heads else tensor


def model_plan(model: Any, arch: Arch, qtype: str, notes: list[str]) -> list[PlannedTensor]:
    """Every tensor of the model in llama.cpp's names and layout; a tensor llama.cpp has no place for is refused."""
    plan: list[PlannedTensor] = []
    if rope_parameters(model.config)["rope_type"] == "llama3":
        factors = llama3_rope_factors(model.config)
        plan.append(PlannedTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                                  lambda: factors))
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and arch.tied:
            continue  # llama.cpp uses token_embd for the head when the file has no output.weight
        name = gguf_name(arch, key)
        if name is None:
            raise DesktuneError(f"the model has a tensor llama.cpp's {arch.name} has no place for: {key}",
                                where=arch.hf_name, fix="convert this model with llama.cpp's convert_hf_to_gguf.py")
        shape = tuple(tensor.shape)
        plan.append(PlannedTensor(name, shape, tensor_type(name, shape, qtype, notes),
                                  _weight(tensor, heads_to_permute(arch, key))))
    return plan


def model_writer(model: Any, tokenizer: Any, qtype: str, name: str,
                 notes: list[str]) -> tuple[Callable[[Path], None], TokenizerMeta]:
    """Check everything about a (merged) model and its tokenizer; the function that writes its GGUF, and what the
    file will say about the tokenizer."""
    from desktune.data.templates import own_template

    config = model.config
    arch = arch_of(config)
    meta: TokenizerMeta = tokenizer_meta(tokenizer, config.vocab_size, own_template(tokenizer))
    notes.extend(meta.notes)
    plan = model_plan(model, arch, qtype, notes)

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path=None, arch=arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        write_hparams(writer, config, arch)
        writer.add_file_type(QTYPES[qtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, meta)
        stream_tensors(writer, plan, path)

    return write, meta


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise DesktuneError("the output is a folder", where=str(out), fix="pass a file name, e.g. --out model.gguf")
    if out.exists() and not force:
        raise DesktuneError("the output file exists", where=str(out),
                            fix="choose another --out, or pass --force to replace it (nothing was written)")


def _check_type(qtype: str, adapter_only: bool) -> None:
    allowed = ("f32", "f16", "bf16", "q8_0") if adapter_only else MODEL_TYPES
    if qtype not in allowed:
        what = "an adapter" if adapter_only else "a model"
        raise DesktuneError(f"--type {qtype} is not written for {what}", where="--type",
                            fix=f"use one of {', '.join(allowed)}")


def _load(kind: str, folder: Path, model: str | None, dtype: str, into: str | None,
          notes: list[str]) -> tuple[Any, Any]:
    """The merged model (adapter) or the model itself (model folder), with its tokenizer."""
    if kind == "adapter":
        from desktune.export.merge import merged_model

        return merged_model(folder, model=model, dtype=dtype, into=into, log=notes.append)
    if model is not None or into is not None:
        raise DesktuneError("--model and --into are for merging an adapter; this is a model folder",
                            where=str(folder), fix="leave out --model and --into")
    from desktune.config import ModelConfig
    from desktune.hardware import DTYPES, Hardware, pick_device
    from desktune.models.loading import load_model

    loaded = load_model(ModelConfig(name=str(folder)), Hardware(device=pick_device("cpu"), dtype=DTYPES[dtype]),
                        quant="none")
    return loaded.model, loaded.tokenizer


def _display_name(kind: str, folder: Path, model: Any) -> str:
    base = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name
    if kind == "model":
        return base
    run = folder.parent.name if folder.name in (RunDir(folder.parent).adapter.name, RunDir(folder.parent).best.name) \
        else folder.name
    return f"{base} + {run}"


def _note_qlora_adapter(folder: Path, notes: list[str]) -> None:
    """Say that a QLoRA adapter alone lands on 16-bit weights in llama.cpp (what `--into original` merges)."""
    from desktune.export.merge import QUANTIZED, read_adapters

    quant = read_adapters([folder])[0].quant
    if quant in QUANTIZED:
        notes.append(f"this adapter trained on a {quant} base: llama.cpp applies it to the base GGUF's weights, as "
                     "`merge --into original` does (desktune eval shows what that costs); the merged export "
                     "reproduces what training saw")


def _modelfile(out: Path, meta: TokenizerMeta, *, ollama_from: str | None, adapter_only: bool) -> Modelfile:
    """The Modelfile of a model GGUF (FROM the file) or of an adapter GGUF (FROM `ollama_from`, ADAPTER the file)."""
    stops = list(dict.fromkeys(meta.tokens[i] for k in ("eos", "eot") if (i := meta.special_ids.get(k)) is not None))
    eos = meta.tokens[meta.special_ids["eos"]] if "eos" in meta.special_ids else ""
    if not adapter_only:
        return build_modelfile(relative(out, out.parent), meta.chat_template, stops, eos)
    base = Path(str(ollama_from)).expanduser()
    if base.is_file():
        return build_modelfile(relative(base, out.parent), meta.chat_template, stops, eos,
                               adapter=relative(out, out.parent), source_template=gguf_template(base))
    found = build_modelfile(str(ollama_from), meta.chat_template, stops, eos, adapter=relative(out, out.parent))
    found.notes.append(f"FROM {ollama_from}: an Ollama model name (not a file here), so its template is not checked")
    return found


def export_gguf(source: Path, out: Path, *, qtype: str = "f16", adapter_only: bool = False,
                model: str | None = None, merge_dtype: str | None = None, force: bool = False,
                modelfile: bool = True, ollama_from: str | None = None, into: str | None = None) -> ExportResult:
    """Write `source` (a run, an adapter folder or a model folder) as a GGUF file at `out`, and an Ollama Modelfile
    beside it (for `adapter_only`, only when `ollama_from` names the base: a GGUF file or an Ollama model).

    The adapter is merged into the base loaded in fp32 (bf16 for --type bf16; `merge_dtype` overrides), so the
    merged weights are rounded once, to the file's type; a QLoRA adapter into the de-quantized 4-bit weights it
    trained on unless `into="original"` (see export/merge.py). With `adapter_only`, the LoRA adapter alone is
    written.
    """
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    _check_type(qtype, adapter_only)
    _check_out(out, force)
    if modelfile:
        _check_out(modelfile_path(out), force)
    kind, folder = resolve_source(source)
    notes: list[str] = []
    meta: TokenizerMeta | None = None
    if adapter_only:
        if kind != "adapter":
            raise DesktuneError("--adapter-only needs a run or an adapter folder", where=str(source),
                                fix="pass a run folder or an adapter folder, or leave out --adapter-only")
        if into is not None:
            raise DesktuneError("--into chooses the weights of a merge; --adapter-only merges nothing",
                                where="--into", fix="leave out --into, or leave out --adapter-only")
        write = adapter_writer(folder, qtype, model, notes)
        _note_qlora_adapter(folder, notes)
        if modelfile and ollama_from:
            meta = adapter_tokenizer_meta(folder, model)
        elif modelfile:
            notes.append("no Modelfile: pass --from BASE.gguf (or an Ollama model name) to write one")
    else:
        dtype = merge_dtype or ("bf16" if qtype == "bf16" else "fp32")
        loaded, tokenizer = _load(kind, folder, model, dtype, into, notes)
        notes.append(f"{'merged' if kind == 'adapter' else 'loaded'} in {dtype}, written as {qtype}")
        write, meta = model_writer(loaded, tokenizer, qtype, _display_name(kind, folder, loaded), notes)
    files = [OutputFile(out, "the GGUF file", write)]
    if modelfile and meta is not None:  # written with the GGUF: both land, or neither
        found = _modelfile(out, meta, ollama_from=ollama_from, adapter_only=adapter_only)
        files.append(OutputFile(modelfile_path(out), "the Modelfile",
                                lambda p: p.write_text(found.text, encoding="utf-8")))
        notes.extend(found.notes)
    write_files_atomically(files)
    return ExportResult(path=out, bytes=out.stat().st_size, seconds=time.perf_counter() - start, notes=notes,
                        modelfile=files[1].path if len(files) > 1 else None)
