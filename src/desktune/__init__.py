"""desktune: fine-tune open LLMs with LoRA/QLoRA on the hardware you have.

The Python API mirrors the CLI verbs::

    import desktune
    cfg = desktune.load_config("examples/demo.yaml", ["train.max_steps=10"])
    result = desktune.train(cfg)
    print(desktune.generate("Who are you?", adapter=result.adapter_dir))
    desktune.merge(result.adapter_dir, "merged/")
    desktune.export_gguf(result.run_dir, "tuned.gguf", qtype="q8_0")
    print(desktune.evaluate(result.run_dir).forgetting)
    desktune.report(result.run_dir)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desktune.constants import VERSION as __version__
from desktune.errors import DesktuneError

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from desktune.config import RunConfig
    from desktune.evaluation.results import EvalResult
    from desktune.training.loop import RunResult

__all__ = ["DesktuneError", "RunConfig", "RunResult", "StopToken", "__version__", "demo", "evaluate", "export_gguf",
           "generate", "load_config", "merge", "report", "train"]


def __getattr__(name: str) -> Any:
    """The public types, imported on first use (RunResult needs torch; `import desktune` stays light)."""
    if name == "RunConfig":
        from desktune.config import RunConfig

        return RunConfig
    if name == "RunResult":
        from desktune.training.loop import RunResult

        return RunResult
    if name == "StopToken":
        from desktune.training.signals import StopToken

        return StopToken
    raise AttributeError(f"module 'desktune' has no attribute {name!r}")


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a YAML path or a mapping, with `section.key=value` overrides."""
    from desktune.config import load_config as _load

    return _load(source, overrides)


def train(config: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | None = None, *,
          quiet: bool = False, stop: Any = None, listeners: list[Any] | None = None) -> RunResult:
    """Train an adapter; returns the RunResult (run_dir, adapter_dir, losses, tokens/s). `stop`: a
    `desktune.StopToken`; its `request()` (from another thread) stops the run after its current step with a
    checkpoint, raising `desktune.training.signals.TrainingInterrupted`, as Ctrl-C does. `listeners`: callables
    given every record of the training loop as it is written (desktune.runs.records: steps, validations, events)."""
    from desktune.config import load_config as _load
    from desktune.training.loop import train as _train

    return _train(_load(config, overrides), quiet=quiet, stop=stop, listeners=listeners or ())


def generate(prompt: str, *, model: str | None = None, adapter: str | Path | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, system: str | None = None) -> str:
    """One answer to a prompt, with or without an adapter (base: the adapter's own, else the embedded model)."""
    from desktune.inference import conversation, load_for_inference, reply

    loaded = load_for_inference(model, adapter)
    return reply(loaded.model, loaded.tokenizer, conversation(prompt, system), max_new_tokens=max_new_tokens,
                 temperature=temperature)


def merge(adapter: str | Path | list[str | Path], output: str | Path, *, model: str | None = None,
          dtype: str = "bf16", weights: list[float] | None = None, into: str | None = None,
          force_base: bool = False) -> Path:
    """`desktune merge`: the adapter(s), weighted, merged into their base; returns the merged model folder."""
    from desktune.export.merge import merge_adapter

    return merge_adapter(adapter, output, model=model, dtype=dtype, weights=weights, into=into,
                         force_base=force_base)


def export_gguf(source: str | Path, out: str | Path, **options: Any) -> Path:
    """`desktune export gguf`: a run, adapter or model folder as a GGUF file (and its Modelfile); options as
    desktune.export.gguf.export_gguf takes them (qtype, adapter_only, into, ollama_from, ...). Returns the file."""
    from desktune.export.gguf import export_gguf as run_export

    return run_export(Path(source), Path(out), **options).path


def demo(output_dir: str | Path = "runs", max_steps: int | None = None) -> RunResult:
    """Run the demo (embedded model, demo data) and return its RunResult."""
    from desktune.demo_run import run_demo

    return run_demo(Path(output_dir), max_steps)[0]


def evaluate(run_dir: str | Path | None = None, **options: Any) -> EvalResult:
    """`desktune eval`: held-out loss base vs tuned, forgetting, the NF4 cost, answers; written to eval.json.

    Options are EvalRequest's fields: model, adapter, data, reference, prompts, forgetting, probe, nf4, device, out.
    """
    from desktune.evaluation.run import EvalRequest
    from desktune.evaluation.run import evaluate as _evaluate

    return _evaluate(EvalRequest(run_dir=Path(run_dir) if run_dir is not None else None, **options))


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """`desktune report`: the run's self-contained HTML page; returns its path."""
    from desktune.reporting.html import write_report

    return write_report(Path(run_dir), Path(out) if out is not None else None)
