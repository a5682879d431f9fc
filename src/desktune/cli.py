"""The `desktune` command: demo, train, chat, generate, merge."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from desktune.errors import DesktuneError

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Fine-tune open LLMs with LoRA/QLoRA on the hardware you have: one GPU, a laptop, or a CPU.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error message, one line: easy to read and to grep

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Base model: embedded name, local folder, .gguf file or hub id "
                 "(default: the adapter's base, else smollm2-135m-instruct)."),
]
AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", "-a", help="A PEFT adapter folder (a run's adapter/ or a checkpoint).")
]
Dtype = Enum("Dtype", {v: v for v in ("auto", "bf16", "fp16", "fp32")}, type=str)
Quant = Enum("Quant", {v: v for v in ("none", "nf4", "int8")}, type=str)
Checkpointing = Enum("Checkpointing", {v: v for v in ("full", "selective", "off")}, type=str)
Device = Enum("Device", {v: v for v in ("auto", "cpu", "cuda", "mps")}, type=str)
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Compute precision.")]
QuantOpt = Annotated[Quant, typer.Option("--quant", help="Load the base in 4-bit NF4 or 8-bit.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run.")]
SystemOpt = Annotated[str | None, typer.Option(help="A system message.")]


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the run folder goes.")] = Path("runs"),
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the demo's).")] = None,
) -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct on the demo data and show base vs tuned answers.

    Runs on the CPU in a few minutes: converts the embedded model once into the cache, answers the held-out
    prompts, trains a LoRA adapter (train and validation loss shown as they fall), answers again, and prints
    where the adapter was saved and its size.
    """
    from desktune.demo_run import run_demo

    run_demo(output_dir=output_dir, max_steps=max_steps, console=out)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="A run config (YAML); see examples/.")],
    override: Annotated[
        list[str] | None,
        typer.Option("--override", "-o", help="Override a config key: -o train.lr=1e-4 -o lora.r=8 (repeatable)."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar (metrics.jsonl is still written).")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue exactly from a checkpoint: alone, the latest checkpoint of the "
                     "run (run_name) or of the newest run in output_dir; or a run folder / checkpoint path."),
    ] = None,
    accept_changes: Annotated[
        bool, typer.Option("--accept-changes", help="Resume even though the config or data changed.")
    ] = False,
) -> None:
    """Train a LoRA/QLoRA adapter as a YAML config describes.

    Writes a run folder (OUTPUT_DIR/RUN_NAME) with the resolved config.yaml, metrics.jsonl (one line per step),
    checkpoints/step-N adapters and the final adapter/ in standard PEFT format.

    Example: desktune train examples/demo.yaml -o train.max_steps=20 -o lora.r=8
    """
    from desktune.config import load_config
    from desktune.training.loop import train as run_train
    from desktune.training.signals import TrainingInterrupted

    cfg = load_config(config, override or [])
    try:
        result = run_train(cfg, console=out, quiet=quiet, resume=True if resume == LATEST else resume,
                           accept_changes=accept_changes)
    except TrainingInterrupted as stop:
        err.print(f"stopped after step {stop.step}; checkpoint saved: {stop.checkpoint}\n"
                  f"resume with: desktune train {config} --resume {Path(stop.checkpoint).parent.parent}")
        raise typer.Exit(130) from None
    val = f", validation loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    out.print(f"done: {result.steps} steps, train loss {result.train_losses[0]:.4f} -> "
              f"{result.final_train_loss:.4f}{val}; {result.tokens_per_s:.0f} tokens/s")


@app.command()
def plan(
    config: Annotated[Path | None, typer.Argument(help="A run config (YAML); or use --model and friends.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Catalog name (llama-3.1-8b, qwen2.5-7b, "
                                              "...), a model folder or config.json, or a hub id.")] = None,
    budget: Annotated[str | None, typer.Option(help="Memory to fit in: 24GB, 8GiB, or auto (free now).")] = None,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Tokens per sample (data.max_seq_len).")] = None,
    micro_batch: Annotated[int | None, typer.Option(min=1, help="Samples per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option(min=1, help="Micro-batches per optimizer step.")] = None,
    quant: Annotated[Quant | None, typer.Option(help="Base weights: none, nf4 (QLoRA) or int8.")] = None,
    lora_r: Annotated[int | None, typer.Option(min=1, help="LoRA rank.")] = None,
    targets: Annotated[str | None, typer.Option(help="LoRA targets: all-linear or q_proj,k_proj,...")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, adamw_8bit, paged_adamw, paged_adamw_8bit.")] = None,
    checkpointing: Annotated[Checkpointing | None, typer.Option(
        help="Gradient checkpointing: full (every layer), selective (every second layer) or off.")] = None,
    full_loss: Annotated[bool, typer.Option("--full-loss", help="Plan the full-logits loss, not chunked.")] = False,
    device: Annotated[str, typer.Option(help="cuda, cpu or mps (default: the config's device; cuda "
                                         "with --model).")] = "",
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32 (default: what the device would use).")] = "",
) -> None:
    """Predict the peak memory of a training step by component, before loading anything.

    Works from a config or from --model alone (a catalog name or a config.json: no weights needed). With a budget
    it says whether the step fits, the largest sequence length and micro-batch that do, and which changes would.
    Example: desktune plan --model llama-3.1-8b --quant nf4 --seq-len 2048 --micro-batch 2 --budget 24GB
    """
    from desktune.config import load_config
    from desktune.memory.budget import budget_bytes, plan_run
    from desktune.memory.render import print_plan

    if config is None and model is None:
        raise DesktuneError("nothing to plan", where="desktune plan", fix="pass a CONFIG.yaml or --model NAME")
    overrides: list[str] = []
    if model:
        overrides.append(f"model.name={model}")
    for key, value in (("data.max_seq_len", seq_len), ("train.micro_batch_size", micro_batch),
                       ("train.grad_accum", grad_accum), ("model.quant", quant.value if quant else None),
                       ("lora.r", lora_r), ("train.optimizer", optimizer),
                       ("train.gradient_checkpointing", checkpointing.value if checkpointing else None)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if targets:
        overrides.append(f"lora.target_modules={targets if targets == 'all-linear' else '[' + targets + ']'}")
    if full_loss:
        overrides.append("train.chunked_loss=false")
    raw = config if config is not None else {"data": {"train": "-"}}
    cfg = load_config(raw, overrides)
    if dtype and dtype not in DTYPE_BYTES:
        raise DesktuneError(f"unknown dtype '{dtype}'", where="--dtype", fix="use bf16, fp16 or fp32")
    if device and device not in {"cuda", "cpu", "mps"}:
        raise DesktuneError(f"unknown device '{device}'", where="--device", fix="use cuda, cpu or mps")
    if device or config is None:  # planning for a named device: no torch import, answers in a second
        device_type, dtype_bytes = device or "cuda", DTYPE_BYTES[dtype or "bf16"]
    else:
        from desktune.hardware import detect

        hw = detect(cfg.train.device, dtype or cfg.model.dtype)
        device_type, dtype_bytes = hw.device.type, hw.dtype.itemsize
    limit = budget or cfg.train.memory_budget
    _, result = plan_run(cfg, device_type, dtype_bytes)
    print_plan(result, budget_bytes(limit, device_type) if limit else None, console=out)


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    dtype: DtypeOpt = Dtype.auto,
    quant: QuantOpt = Quant.none,
    device: DeviceOpt = Device.auto,
) -> None:
    """Answer one prompt, streaming tokens, with or without an adapter.

    Example: desktune generate "Who are you?" --adapter runs/demo/adapter
    """
    from desktune.inference import conversation, load_for_inference, reply

    loaded = load_for_inference(model, adapter, dtype=dtype.value, device=device.value, quant=quant.value)
    reply(loaded.model, loaded.tokenizer, conversation(prompt, system), max_new_tokens=max_new_tokens,
          temperature=temperature, on_text=lambda t: print(t, end="", flush=True))
    print()


@app.command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.7,
    dtype: DtypeOpt = Dtype.auto,
    quant: QuantOpt = Quant.none,
    device: DeviceOpt = Device.auto,
) -> None:
    """Chat in the terminal with a model, with or without an adapter (answers stream as they are made).

    Type a message and press Enter; /reset clears the conversation, /exit (or Ctrl-D) leaves.
    Example: desktune chat --adapter runs/demo/adapter
    """
    from desktune.inference import conversation, load_for_inference, reply

    loaded = load_for_inference(model, adapter, dtype=dtype.value, device=device.value, quant=quant.value)
    history = conversation(None, system)
    start = len(history)
    err.print("[dim]chat ready: /reset clears, /exit leaves[/]")
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip() in {"/exit", "/quit"}:
            return
        if text.strip() == "/reset":
            del history[start:]
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = reply(loaded.model, loaded.tokenizer, history, max_new_tokens=max_new_tokens,
                       temperature=temperature, on_text=lambda t: print(t, end="", flush=True))
        print()
        history.append({"role": "assistant", "content": answer})


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="The PEFT adapter folder to merge.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.")],
    model: ModelOpt = None,
    dtype: Annotated[str, typer.Option(help="Merged weights' precision: bf16 or fp16 (or fp32).")] = "bf16",
) -> None:
    """Merge an adapter into its 16-bit base and save a plain transformers model folder.

    The base is always loaded in 16-bit, also for a QLoRA adapter (never merged into de-quantized 4-bit
    weights). The folder holds safetensors weights, tokenizer and chat template.
    Example: desktune merge runs/demo/adapter -o merged/
    """
    from desktune.export.merge import merge_adapter

    folder = merge_adapter(adapter, output, model=model, dtype=dtype)
    out.print(f"merged model saved: [bold]{folder}[/]")


LATEST = "latest"


def _optional_resume_value(argv: list[str]) -> list[str]:
    """`--resume` alone means the latest checkpoint: give it a value typer can parse."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, LATEST)
            break
    return out


def main() -> None:
    """Entry point: user errors print one message and exit 2, never a traceback."""
    sys.argv[1:] = _optional_resume_value(sys.argv[1:])
    try:
        app()
    except DesktuneError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
