"""The `desktune` command: demo, train, stop, eval, report, plan, generate, chat, merge, export, serve."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.markup import escape

from desktune.config import ModelConfig, TrainConfig
from desktune.console import make_console
from desktune.constants import DEBUG_ENV, DTYPE_BYTES, DTYPE_NAMES, VERSION
from desktune.errors import DesktuneError
from desktune.runs.layout import METRICS, RunDir
from desktune.serving.settings import Limits

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's plain help: paragraphs re-flowed to the width, flags without a <bool> type
    pretty_exceptions_enable=False,
    help="Fine-tune open LLMs with LoRA/QLoRA on the hardware you have: one GPU, a laptop, or a CPU.",
)
_LIMITS = Limits()  # the server's defaults, owned by serving/settings.py
EXIT_UNTAUGHT = 3  # a run that finished but diverged or learned nothing (0: it taught, 2: a user error, 130: stopped)
out = make_console()
err = make_console(stderr=True, soft_wrap=True)  # one error message, one line: easy to read and to grep

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", metavar="NAME", help="Base model: embedded name, local folder, .gguf file or hub id "
                 "(default: the adapter's base, else smollm2-135m-instruct)."),
]
AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", "-a", help="A PEFT adapter folder (a run's adapter/ or a checkpoint).")
]


def _choice(name: str, values: tuple[str, ...]) -> Any:
    """A typer choice (typer takes Enums, not click types) from the values a config field allows."""
    return Enum(name, {v: v for v in values}, type=str)


def _allowed(model: Any, field: str) -> tuple[str, ...]:
    return get_args(model.model_fields[field].annotation)


Dtype = _choice("Dtype", _allowed(ModelConfig, "dtype"))
Quant = _choice("Quant", _allowed(ModelConfig, "quant"))
Device = _choice("Device", _allowed(TrainConfig, "device"))
Optimizer = _choice("Optimizer", _allowed(TrainConfig, "optimizer"))
Checkpointing = _choice("Checkpointing", ("full", "selective", "off"))
Precision = _choice("Precision", DTYPE_NAMES)  # a concrete dtype: bf16, fp16 or fp32
PlanDevice = _choice("PlanDevice", tuple(d for d in _allowed(TrainConfig, "device") if d != "auto"))
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Compute precision.")]
QuantOpt = Annotated[Quant, typer.Option("--quant", help="Load the base in 4-bit NF4 or 8-bit.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run.")]
SystemOpt = Annotated[str | None, typer.Option(help="A system message.")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also read weights or trainer state stored as pickles (.bin, .pt): only from a source "
    "you trust (loading a pickle can run code; desktune then uses torch.load(weights_only=True)).")]


def _trust(allow_pickle: bool) -> None:
    """Pass --allow-pickle on to everything this command loads (desktune.safety)."""
    from desktune.safety import allow_pickle as allow

    allow(allow_pickle)


def _version(show: bool) -> None:
    if show:
        out.print(f"desktune {VERSION}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune open LLMs with LoRA/QLoRA on the hardware you have: one GPU, a laptop, or a CPU.

    Verbs: demo, train, plan, generate, chat, merge, export, serve.
    DESKTUNE_DEBUG=1 adds the full traceback to an error.
    """


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where the run folder goes.")] = Path("runs"),
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the demo's).")] = None,
) -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct on the demo data and show base vs tuned answers.

    Runs on the CPU in a few minutes: converts the embedded model once into the cache, answers the held-out
    prompts, trains a LoRA adapter (train and validation loss shown as they fall), answers again, and prints
    where the adapter was saved and its size.
    """
    from desktune.demo_run import run_demo

    result, _, _ = run_demo(output_dir=output_dir, max_steps=max_steps, console=out)
    _fail_untaught(result)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="A run config (YAML); see examples/.")],
    override: Annotated[
        list[str] | None,
        typer.Option("--override", "-o", metavar="KEY=VALUE",
                     help="Override a config key: -o train.lr=1e-4 -o lora.r=8 (repeatable)."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help=f"No progress bar ({METRICS} is still written).")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", metavar="[RUN|CHECKPOINT]",
                     help="Continue exactly from a checkpoint: alone, the latest checkpoint of the "
                     "run (run_name) or of the newest run in output_dir; or a run folder / checkpoint path."),
    ] = None,
    accept_changes: Annotated[
        bool, typer.Option("--accept-changes", help="Resume even though the config or data changed.")
    ] = False,
    allow_pickle: AllowPickleOpt = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes to train with on this machine (torchrun "
                                       "under the hood; train.distributed picks ddp or fsdp2). Several machines: "
                                       "torchrun --nnodes ... -m desktune train CONFIG.")] = 1,
) -> None:
    """Train a LoRA/QLoRA adapter as a YAML config describes.

    Writes a run folder (OUTPUT_DIR/RUN_NAME) with the resolved config, the record of every step, resumable
    checkpoints and the final adapter/ in standard PEFT format.

    Example: desktune train examples/demo.yaml -o train.max_steps=20 -o lora.r=8
    """
    _trust(allow_pickle)
    if nproc > 1:
        from desktune.training.launch import launch

        raise typer.Exit(launch(_without_nproc(sys.argv[1:]), nproc))
    from desktune.config import load_config
    from desktune.training.loop import train as run_train
    from desktune.training.signals import TrainingInterrupted

    cfg = load_config(config, override or [])
    try:
        result = run_train(cfg, console=out, quiet=quiet, resume=True if resume == LATEST else resume,
                           accept_changes=accept_changes)
    except TrainingInterrupted as stop:
        if os.environ.get("RANK", "0") != "0":  # one of several processes: rank 0 says it
            raise typer.Exit(130) from None
        err.print(f"stopped after step {stop.step}; checkpoint saved: {stop.checkpoint}\n"
                  f"resume with: desktune train {config} --resume {RunDir.of_checkpoint(Path(stop.checkpoint)).path}")
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":  # one of several processes: rank 0 reports
        return
    val = f", validation loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    out.print(f"done: {result.steps} steps, train loss {result.train_losses[0]:.4f} -> "
              f"{result.final_train_loss:.4f}{val}; {result.tokens_per_s:.0f} tokens/s")
    _fail_untaught(result)


def _fail_untaught(result: Any) -> None:
    """A run that diverged or taught nothing says so last and exits with EXIT_UNTAUGHT (README)."""
    if result.outcome.learned:
        return
    err.print(escape(f"the run did not teach the model: {result.outcome.reason}; the adapter kept is "
                     f"{result.adapter_dir} (exit code {EXIT_UNTAUGHT})"))
    raise typer.Exit(EXIT_UNTAUGHT)


@app.command()
def plan(
    config: Annotated[Path | None, typer.Argument(metavar="CONFIG", help="A run config (YAML); or use --model "
                                                  "and friends.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="NAME", help="Catalog name (llama-3.1-8b, "
                                              "qwen2.5-7b, ...), a model folder or config.json, or a hub id.")] = None,
    budget: Annotated[str | None, typer.Option(metavar="SIZE", help="Memory to fit in: 24GB, 8GiB, or auto (free "
                                               "now).")] = None,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Tokens per sample (data.max_seq_len).")] = None,
    micro_batch: Annotated[int | None, typer.Option(min=1, help="Samples per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option(min=1, help="Micro-batches per optimizer step.")] = None,
    quant: Annotated[Quant | None, typer.Option(help="Base weights: none, nf4 (QLoRA) or int8.")] = None,
    lora_r: Annotated[int | None, typer.Option(min=1, help="LoRA rank.")] = None,
    targets: Annotated[str | None, typer.Option(metavar="MODULES", help="LoRA targets: all-linear or "
                                                "q_proj,k_proj,...")] = None,
    optimizer: Annotated[Optimizer | None, typer.Option(help="Optimizer of the adapters.")] = None,
    checkpointing: Annotated[Checkpointing | None, typer.Option(
        help="Gradient checkpointing: full (every layer), selective (every second layer) or off.")] = None,
    full_loss: Annotated[bool, typer.Option("--full-loss", help="Plan the full-logits loss, not chunked.")] = False,
    device: Annotated[PlanDevice | None, typer.Option(help="Plan for this device (default: the config's device; "
                                                   "cuda with --model).")] = None,
    dtype: Annotated[Precision | None, typer.Option(help="Compute precision (default: what the device would "
                                                    "use).")] = None,
    list_models: Annotated[bool, typer.Option("--list", help="List the built-in architectures and exit.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Devices sharing a step; plan and budget per device.")] = 1,
    distributed: Annotated[str | None, typer.Option(metavar="ddp|fsdp2", help="With --nproc: ddp or fsdp2 (shards "
                                                    "decoder layers).")] = None,
    offload_params: Annotated[bool | None, typer.Option(help="fsdp2: sharded parameters in host memory.")] = None,
) -> None:
    """Predict the peak memory of a training step by component, before loading anything.

    Works from a config or from --model alone (a catalog name or a config.json: no weights needed). With a budget
    it says whether the step fits, the largest sequence length and micro-batch that do, and which changes would.

    \b
    Example: desktune plan --model llama-3.1-8b --quant nf4 --seq-len 2048 \\
               --micro-batch 2 --budget 24GB
    """
    from desktune.config import load_config
    from desktune.memory.budget import budget_bytes, effective_budget, plan_run
    from desktune.memory.render import catalog, print_plan

    if list_models:
        out.print(catalog())
        return
    if config is None and model is None:
        raise DesktuneError("nothing to plan", where="desktune plan", fix="pass a CONFIG.yaml or --model NAME")
    values = {"model.name": model, "data.max_seq_len": seq_len, "train.micro_batch_size": micro_batch,
              "train.grad_accum": grad_accum, "model.quant": quant, "lora.r": lora_r, "train.optimizer": optimizer,
              "train.gradient_checkpointing": checkpointing, "train.distributed": distributed,
              "lora.target_modules": None if not targets else targets if targets == "all-linear" else f"[{targets}]",
              "train.chunked_loss": False if full_loss else None, "train.offload_params": offload_params}
    overrides = [f"{k}={v.value if isinstance(v, Enum) else v}" for k, v in values.items() if v is not None]
    cfg = load_config(config if config is not None else {"data": {"train": "-"}}, overrides)
    kernel = False  # a named device's CPU is not this one: its attention planned on PyTorch's SDPA (the larger)
    if device or config is None:  # planning for a named device: no torch import, answers in a second
        device_type, dtype_bytes = device.value if device else "cuda", DTYPE_BYTES[dtype.value if dtype else "bf16"]
        setting = effective_budget(cfg.train.memory_budget, device_type)
        setting = None if setting == "auto" else setting  # not the free memory of a device that may not be here
    else:
        from desktune.hardware import detect

        hw = detect(cfg.train.device, dtype.value if dtype else cfg.model.dtype)
        device_type, dtype_bytes, kernel = hw.device.type, hw.dtype.itemsize, hw.cpu_attention_kernel
        setting = effective_budget(cfg.train.memory_budget, device_type)
    limit = budget or setting
    _, result = plan_run(cfg, device_type, dtype_bytes, nproc, kernel)
    print_plan(result, budget_bytes(limit, device_type) if limit else None, console=out)



@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(metavar="PROMPT", help="The user message (or --prompts FILE).")
                      ] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", "-p", metavar="FILE", help="Answer every prompt of a "
                                                 "file: .txt (one per line) or .jsonl (prompt and optionally system).")
                       ] = None,
    output: Annotated[Path | None, typer.Option("--output", "--out", metavar="FILE", help="Write the answers "
                                                "here as JSON lines (default: print them).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts answered together (greedy answers).")] = 8,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    dtype: DtypeOpt = Dtype.auto,
    quant: QuantOpt = Quant.none,
    device: DeviceOpt = Device.auto,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Answer one prompt (streamed) or a file of prompts (in batches), with or without an adapter.

    With --prompts, greedy answers are made --batch-size at a time (a temperature samples them one by one,
    prompt i seeded with i); each line of --output is the prompt's line (prompt, system, your own fields) plus
    "answer", and the file is written whole at the end, in one rename. Progress goes to stderr.

    \b
    Example: desktune generate "Who are you?" --adapter runs/demo/adapter
    Example: desktune generate --prompts questions.txt --output answers.jsonl \\
               --adapter runs/demo/adapter
    """
    _trust(allow_pickle)
    import json

    from desktune.inference import answer_prompts, conversation, load_for_inference, prompt_rows, reply, write_jsonl

    rows = prompt_rows(prompt, prompts, output)  # a bad prompt file is reported before the model loads
    loaded = load_for_inference(model, adapter, dtype=dtype.value, device=device.value, quant=quant.value)
    if prompts is None and output is None:
        reply(loaded.model, loaded.tokenizer, conversation(prompt, system), max_new_tokens=max_new_tokens,
              temperature=temperature, on_text=lambda t: print(t, end="", flush=True))
        print()
        return
    done = [0]

    def progress(batch: list[dict[str, Any]]) -> None:
        done[0] += len(batch)
        err.print(f"answered {done[0]}/{len(rows)} prompts", highlight=False)
        if output is None:
            for row in batch:
                print(json.dumps(row, ensure_ascii=False), flush=True)

    answered = answer_prompts(loaded.model, loaded.tokenizer, rows, system=system, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, temperature=temperature, on_batch=progress)
    if output is not None:
        write_jsonl(output, answered)
        err.print(f"answers written: {output}", highlight=False, markup=False)


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
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Chat in the terminal with a model, with or without an adapter (answers stream as they are made).

    Type a message and press Enter; the conversation is kept until /reset. /adapter PATH switches to another
    adapter trained on the same base (its chat template too), /adapter off (or /base) to the base alone; a bad
    adapter is refused and the current one stays. /system TEXT sets the system message (/system alone removes
    it). Switching and /system start a new conversation (the system message stays). /help lists the commands,
    /exit (or Ctrl-D) leaves.

    Example: desktune chat --adapter runs/demo/adapter
    """
    _trust(allow_pickle)
    from desktune.inference import ChatSession, base_name, chat_loop, load_for_inference

    name = base_name(model, adapter)  # a bad adapter folder is reported before the base loads
    loaded = load_for_inference(name, None, dtype=dtype.value, device=device.value, quant=quant.value)
    session = ChatSession(loaded.model, loaded.tokenizer, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature)
    if adapter is not None:
        session.use_adapter(adapter)
    _line_editing()
    chat_loop(session, input, lambda t: print(t, end="", flush=True),
              lambda t: err.print(t, highlight=False, markup=False))


def _line_editing() -> None:
    """In a terminal, input() edits the line (arrows, Home/End) and recalls earlier ones once readline is loaded;
    without it the arrow keys type ^[[D into the message."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # Windows has no readline; its console edits lines itself
            import readline  # noqa: F401


Into = _choice("Into", ("dequantized", "original"))  # = desktune.export.merge.INTO
IntoOpt = Annotated[Into | None, typer.Option("--into", help="dequantized: the 4-bit/8-bit weights a QLoRA adapter "
                                              "trained on, de-quantized (its default); original: the original "
                                              "16-bit weights (the only choice for other adapters).")]


@app.command()
def merge(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTER", help="The PEFT adapter folder(s) to "
                                                   "merge, all trained on one base.")],
    output: Annotated[Path, typer.Option("--output", metavar="DIR", help="Folder for the merged model.")],
    model: ModelOpt = None,
    dtype: Annotated[Precision, typer.Option(help="Merged weights' precision.")] = Precision.bf16,
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="One weight per adapter, comma-separated "
                                                "(default 1 each), e.g. 0.7,0.3.")] = None,
    into: IntoOpt = None,
    force_base: Annotated[bool, typer.Option("--force-base", help="Merge even when the base does not match the "
                                             "adapters' recorded base (fingerprint or name).")] = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Merge one or more adapters, weighted, into their base and save a plain transformers model folder.

    Each layer becomes W + sum of weight x adapter delta, summed in fp32 and rounded once to --dtype.
    For a QLoRA adapter, W is by default the 4-bit weight training saw, de-quantized (--into dequantized).
    The base must be the one the adapters trained on: checked by the fingerprint desktune records beside each
    adapter, else by name (--force-base skips the check).
    The folder holds safetensors weights, tokenizer and chat template.

    \b
    Example: desktune merge runs/a/adapter runs/b/adapter --weights 0.7,0.3 \\
               --output merged/
    """
    _trust(allow_pickle)
    from desktune.export.merge import merge_adapter, parse_weights

    folder = merge_adapter(adapters, output, model=model, dtype=dtype.value, weights=parse_weights(weights),
                           into=into.value if into else None, force_base=force_base,
                           log=lambda text: err.print(text, highlight=False))
    out.print(f"merged model saved: [bold]{folder}[/]")


export_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Write a run, an adapter or a model in another format (gguf).")
app.add_typer(export_app, name="export")
GgufType = _choice("GgufType", ("f16", "bf16", "q8_0", "q4_0", "f32"))  # = desktune.export.gguf.MODEL_TYPES


@export_app.command("gguf")
def export_gguf(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="A run folder (its final adapter), an adapter "
                                           "folder, or a model folder.")],
    output: Annotated[Path, typer.Option("--output", "--out", metavar="FILE", help="The GGUF file to write.")],
    qtype: Annotated[GgufType, typer.Option("--type", "-t", help="Weights: f16, bf16, q8_0, q4_0 (embeddings "
                                            "q8_0) or f32; an adapter: f16, bf16, q8_0 or f32.")] = GgufType.f16,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Write the LoRA adapter alone as a GGUF "
                                               "adapter (llama.cpp --lora, Ollama ADAPTER).")] = False,
    model: ModelOpt = None,
    merge_dtype: Annotated[Precision | None, typer.Option(help="Precision of the merge (default fp32, bf16 for "
                                                          "--type bf16; bf16 halves the memory it needs).")] = None,
    into: IntoOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file (and its Modelfile).")
                     ] = False,
    modelfile: Annotated[bool, typer.Option(help="Write an Ollama Modelfile beside the GGUF (OUTPUT.Modelfile).")
                         ] = True,
    ollama_from: Annotated[str | None, typer.Option("--from", help="--adapter-only: the base for the Modelfile's "
                                                    "FROM (a base GGUF file, or an Ollama model name).")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Write a GGUF file for llama.cpp, Ollama and LM Studio, with the gguf package alone (no llama.cpp build).

    The adapter is merged into the base loaded in 16 bit or more (never into 4-bit weights). The file carries the
    whole tokenizer with llama.cpp's pre-tokenizer type, the chat template used in training and the end-of-turn
    token that stops generation; what cannot be written exactly (architecture, tokenizer, RoPE scaling) is
    refused. Beside it goes OUTPUT.Modelfile for `ollama create NAME -f OUTPUT.Modelfile`: TEMPLATE where the
    training template has an exact Ollama translation, PARAMETER stop for each end-of-generation token.

    Example: desktune export gguf runs/demo --output demo.gguf --type q8_0
    """
    _trust(allow_pickle)
    from desktune.export.gguf import export_gguf as run_export
    from desktune.units import human_bytes

    result = run_export(source, output, qtype=qtype.value, adapter_only=adapter_only, model=model,
                        merge_dtype=merge_dtype.value if merge_dtype else None, force=force, modelfile=modelfile,
                        ollama_from=ollama_from, into=into.value if into else None)
    for note in result.notes:
        out.print(f"  {note}", highlight=False)
    out.print(f"GGUF written: [bold]{result.path}[/] ({human_bytes(result.bytes)}, {result.seconds:.1f} s)")
    if result.modelfile is not None:
        out.print(f"Modelfile: [bold]{result.modelfile}[/]  (ollama create NAME -f {result.modelfile})")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path | None, typer.Argument(metavar="RUN_DIR", help="A run folder (its config, adapter, "
                                                   "validation set).")] = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Held-out data file (default: the run's "
                                             "validation set).")] = None,
    reference: Annotated[str | None, typer.Option(help="Your own forgetting reference: .txt (a prompt per line) "
                                                  "or .jsonl with prompt (and optionally answer).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompts to answer base vs tuned (.txt or .jsonl; default: "
                                                "the demo's, for a demo run).")] = None,
    forgetting: Annotated[bool, typer.Option(help="Measure forgetting on the general reference.")] = True,
    probe: Annotated[bool, typer.Option(help="Ask the knowledge probe (part of forgetting).")] = True,
    nf4: Annotated[bool, typer.Option(help="Also score the base in 4-bit NF4 against 16 bit.")] = True,
    device: DeviceOpt = Device.auto,
    output: Annotated[Path | None, typer.Option("--output", metavar="FILE", help="Where the JSON goes (default: "
                                                "RUN_DIR/eval.json).")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Held-out loss and perplexity base vs tuned, forgetting, the cost of 4-bit loading, and answers.

    Example: desktune eval runs/demo
    """
    _trust(allow_pickle)
    from desktune.evaluation.render import render
    from desktune.evaluation.run import EvalRequest, output_path
    from desktune.evaluation.run import evaluate as run_eval

    req = EvalRequest(run_dir=run_dir, model=model, adapter=adapter, data=data, reference=reference,
                      prompts=prompts, forgetting=forgetting, probe=probe, nf4=nf4, device=device.value, out=output)
    result = run_eval(req, console=err)
    out.print(render(result))
    out.print(f"written: [bold]{output_path(req)}[/]")


@app.command()
def stop(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The folder of a run in progress.")],
) -> None:
    """Ask a running `desktune train` to stop after its current step, as Ctrl-C does: a checkpoint, then exit 130.

    Works from another terminal or process (it writes RUN_DIR/STOP, which the run watches and removes).

    Example: desktune stop runs/20261208-101500
    """
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise DesktuneError(f"not a run folder (no {run.config.name})", where=str(run_dir),
                            fix="pass the folder `desktune train` printed as its run folder")
    try:
        run.stop_request.write_text("stop\n", encoding="utf-8")
    except OSError as e:
        raise DesktuneError(f"cannot write the stop request ({e.strerror or e})", where=str(run.stop_request),
                            fix="run this as a user who can write to the run folder") from e
    out.print(f"asked the run to stop after its current step: {run.stop_request} (it saves a checkpoint, then "
              f"exits; resume with `desktune train CONFIG --resume {run_dir}`)")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder.")],
    output: Annotated[Path | None, typer.Option("--output", metavar="FILE", help="The HTML file (default: "
                                                "RUN_DIR/report.html).")] = None,
    tensorboard: Annotated[Path | None, typer.Option(help="Also write the records as TensorBoard scalars "
                                                     "to this folder (needs the tensorboard package).")] = None,
) -> None:
    """One self-contained HTML page of a run: plots, config, diagnostics, evaluation, answers.

    Example: desktune report runs/demo
    """
    from desktune.reporting.html import write_report

    if not RunDir(run_dir).metrics.is_file():
        raise DesktuneError(f"not a run folder (no {METRICS})", where=str(run_dir),
                            fix="pass a folder made by `desktune train` or `desktune demo`")
    out.print(f"report written: [bold]{write_report(run_dir, output)}[/]")
    if tensorboard is not None:
        from desktune.reporting.tensorboard import write_tensorboard

        out.print(f"TensorBoard logs: [bold]{write_tensorboard(run_dir, tensorboard)}[/] "
                  f"(tensorboard --logdir {tensorboard})")


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", metavar="NAME=PATH", help="NAME=PATH (or PATH, named after its run): an adapter served "
        "as model NAME (repeatable; all on the same base).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs an API key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="DESKTUNE_API_KEY", show_envvar=True,
        help="Require Authorization: Bearer KEY on every request (the variable keeps it out of `ps`).")] = None,
    max_tokens_limit: Annotated[int, typer.Option(
        min=1, help="Most tokens one answer may ask for.")] = _LIMITS.max_tokens,
    max_prompt_tokens: Annotated[int | None, typer.Option(min=1, help="Longest prompt in tokens (default: the "
                                                          "model's context).")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body.")] = _LIMITS.max_body_bytes,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Generations in flight (running or waiting for the "
                                                "model); beyond that 429.")] = _LIMITS.max_concurrent,
    dtype: DtypeOpt = Dtype.auto,
    quant: QuantOpt = Quant.none,
    device: DeviceOpt = Device.auto,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Serve a base model and its adapters over an OpenAI-compatible HTTP API (chat, completions, models).

    Each adapter is a model name; the base answers under its own name. Binds 127.0.0.1 unless told otherwise.

    Example: desktune serve --adapter pirate=runs/demo/adapter, then any OpenAI client with
    base_url http://127.0.0.1:8000/v1 and model "pirate".
    """
    _trust(allow_pickle)
    from desktune.serving import Limits, ServeSettings, parse_adapters
    from desktune.serving.server import serve as run_server

    limits = Limits(max_tokens=max_tokens_limit, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                    max_concurrent=max_concurrent)
    settings = ServeSettings(host=host, port=port, api_key=api_key or None, limits=limits)
    run_server(settings, model=model, adapters=parse_adapters(adapter or []), dtype=dtype.value, device=device.value,
               quant=quant.value, log=lambda text: err.print(text, highlight=False))


def _whole_summaries(*apps: typer.Typer) -> None:
    """`desktune --help` lists each command with its first sentence whole (click cuts a long one with "...")."""
    for info in (c for a in apps for c in a.registered_commands):
        if info.short_help is None and info.callback is not None and info.callback.__doc__:
            info.short_help = " ".join(info.callback.__doc__.strip().split("\n\n")[0].split())


_whole_summaries(app, export_app)
LATEST = "latest"


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line each rank runs: this one without --nproc N (or --nproc=N)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


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
        rank = f"\\[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        err.print(f"{rank}[bold red]error:[/] {escape(str(e))}", highlight=False)  # data[v2].jsonl stays text
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):  # the cause too, for a bug report
            err.print("".join(traceback.format_exception(e)), highlight=False, markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
