"""`desktune demo`: tune the embedded model on the demo data and show base vs tuned answers side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from desktune.config import load_config
from desktune.console import make_console
from desktune.errors import DesktuneError
from desktune.hardware import human_bytes
from desktune.runs import RunDir
from desktune.scoring.generate import ANSWER_REPETITION_PENALTY as REPETITION_PENALTY
from desktune.scoring.generate import replies
from desktune.training.loop import RunResult, fit, setup


def examples_dir() -> Path:
    """The examples folder: inside an installed wheel, else the source checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples", here.parents[1] / "examples"):
        if (candidate / "demo.yaml").is_file():
            return candidate
    raise DesktuneError("the examples folder (demo.yaml and demo/) is missing from this installation",
                        fix="reinstall desktune from its source checkout: pip install -e .")


def demo_prompts(folder: Path) -> list[str]:
    """Held-out prompts of the demo, one per line."""
    return [line.strip() for line in (folder / "demo" / "prompts.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _table(prompts: list[str], before: list[str], after: list[str]) -> Table:
    table = Table(title="Held-out prompts: base model vs tuned model", show_lines=True, expand=True)
    table.add_column("prompt", ratio=1, style="bold")
    table.add_column("base SmolLM2-135M-Instruct", ratio=2)
    table.add_column("after LoRA fine-tuning", ratio=2, style="green")
    for p, b, a in zip(prompts, before, after, strict=True):
        table.add_row(p, b, a)
    return table


def run_demo(output_dir: Path = Path("runs"), max_steps: int | None = None,
             console: Console | None = None, max_new_tokens: int = 64) -> tuple[RunResult, list[str], list[str]]:
    """Run the demo end to end; returns the run result and the base and tuned answers."""
    console = console or make_console()
    t0 = time.perf_counter()
    folder = examples_dir()
    overrides = [f"output_dir={output_dir}"] + ([f"train.max_steps={max_steps}"] if max_steps else [])
    cfg = load_config(folder / "demo.yaml", overrides)
    console.rule("[bold]desktune demo")
    console.print("Teaching SmolLM2-135M-Instruct (embedded, ~135M parameters) to be 'Captain Quill', a pirate "
                  "librarian, from 72 short conversations - with a LoRA adapter, on this machine.\n"
                  "[dim]First run: the embedded GGUF is converted once to a safetensors folder in the cache.[/]")
    run = setup(cfg, console=console)
    prompts = demo_prompts(folder)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    console.print("answering the held-out prompts with the base model ...")
    run.model.eval()
    with run.model.disable_adapter():
        before = replies(run.model, run.loaded.tokenizer, conversations, max_new_tokens=max_new_tokens,
                         repetition_penalty=REPETITION_PENALTY)
    result = fit(run)
    console.print("answering the same prompts with the tuned model ...")
    run.model.eval()
    after = replies(run.model, run.loaded.tokenizer, conversations, max_new_tokens=max_new_tokens,
                    repetition_penalty=REPETITION_PENALTY)
    wall = time.perf_counter() - t0
    RunDir(result.run_dir).demo_answers.write_text(
        json.dumps([{"prompt": p, "base": b, "tuned": a} for p, b, a in zip(prompts, before, after, strict=True)],
                   indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(_table(prompts, before, after))
    val = result.val_losses
    console.print(f"train loss: {result.train_losses[0]:.3f} (step 1) -> {result.final_train_loss:.3f} "
                  f"(step {result.steps})")
    if val:
        console.print(f"validation loss: {val[0][1]:.3f} (before) -> {val[-1][1]:.3f} (after)")
    console.print(f"adapter: [bold]{result.adapter_dir}[/] ({human_bytes(result.adapter_bytes)}, "
                  f"{result.trainable.trainable:,} trainable parameters)")
    console.print(f"metrics: {RunDir(result.run_dir).metrics}   wall time: {wall:.0f} s   "
                  f"training: {result.tokens_per_s:.0f} tokens/s")
    console.print(f"try it: desktune chat --adapter {result.adapter_dir}")
    console.print(f"check it: desktune eval {result.run_dir}   (forgetting, the 4-bit cost)   then   "
                  f"desktune report {result.run_dir}")
    result.extra["wall_s"] = wall
    return result, before, after
