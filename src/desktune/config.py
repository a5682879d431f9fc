"""The schema of a run: one pydantic model, loaded from YAML and overridden with dotted keys."""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from desktune.constants import EMBEDDED_MODEL
from desktune.errors import DesktuneError
from desktune.units import parse_size  # re-exported: the one parser of sizes lives in units

# Field metadata of the keys a resumed run may change without changing what it computes: where it writes,
# how samples split into micro-batches (the loss is normalised per step), checkpointing, threads and budget.
RESUME_MAY_CHANGE = {"resume_may_change": True}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Strict):
    """Which base model to load and how."""

    name: str = Field(
        EMBEDDED_MODEL,
        description="Embedded model name, a local Hugging Face folder, a .gguf file, or a hub id.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` when `name` is a folder.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; auto: bf16 where supported, fp16 on GPUs without bf16, else fp32."
    )
    quant: Literal["none", "nf4", "int8"] = Field(
        "none", description="Load the frozen base in 4-bit NF4 (QLoRA) or 8-bit."
    )
    double_quant: bool = Field(True, description="NF4 only: also quantize the quantization constants.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    chat_template: str | None = Field(
        None, description="A built-in template name (chatml, llama3, mistral, zephyr) or a Jinja string."
    )
    trust_remote_code: bool = False


class LoraConfig(_Strict):
    """The adapter trained on top of the frozen base."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input (0: none; on a CPU "
                           "its random masks cost about a third of a LoRA step, measured).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (the default) for every linear layer but "
        "the output head: LoRA learns most when it adapts the MLP too.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")

    @field_validator("target_modules")
    @classmethod
    def _some_module(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:  # peft would refuse it only after the run folder exists
            raise ValueError("names no module")
        return v


class DataConfig(_Strict):
    """Where the training text comes from and how it becomes tokens."""

    train: str = Field(..., description="Training data: .jsonl, .json, .csv, .parquet or a saved HF dataset folder.")
    val: str | None = Field(None, description="Validation data file; overrides val_fraction.")
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] = Field(
        "auto", description="Share of train held out for validation (seeded by train.seed); auto: 5% of the "
        "samples, 8 to 100, when there are at least 40 (else none), recorded in the run's config; 0: none.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = "auto"
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="A row that cannot be read, converted or rendered (invalid JSON, a missing field, an "
        "empty message, ...): error stops with its file:line; skip leaves it out, counted and named in a note (an "
        "error still when no row is left). A resume may change it: the data file's hash is checked, so it "
        "either skips nothing or stops.", json_schema_extra=RESUME_MAY_CHANGE)
    max_seq_len: int = Field(1024, gt=0, description="Longer samples are truncated (and counted in the log).")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Loss on assistant/completion tokens only, or on every token."
    )
    system_prompt: str | None = Field(None, description="System message added to conversations without one.")
    shuffle: bool = True
    packing: bool = Field(
        True, description="Padding-free: a micro-batch's samples share one row, attention never crosses samples."
    )
    group_by_length: bool = Field(
        True, description="Unpacked: sort each step's samples by length before splitting it, to pad less."
    )
    replay: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] = Field(
        "auto", description="Share of training samples that replay the base's own answers to general prompts, "
        "to keep its general behaviour; auto: 0.1 for chat data, 0 for plain text; 0: off.")
    replay_prompts: str | None = Field(
        None, description="Prompts to replay instead of the built-in 128: a .txt file (one per line) or .jsonl "
        "with \"prompt\" (and \"answer\" to replay given answers instead of the base's).")


class TrainConfig(_Strict):
    """The optimisation loop."""

    epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Passes over the training data; auto: from the dataset's size (small sets get more).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(
        4, gt=0, description="Samples per forward/backward (packed: one row). The default step is one micro-batch "
        "of 4: on a CPU one packed row of 8 samples ran 1.46x the tokens/s of 4 micro-batches of 2 (measured); "
        "memory fitting (train.memory_budget, on by default on CUDA) splits it when it does not fit.",
        json_schema_extra=RESUME_MAY_CHANGE)
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.",
                            json_schema_extra=RESUME_MAY_CHANGE)
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Peak learning rate; auto: from the base's size and the method (docs/defaults.md).")
    time_budget: str | None = Field(
        None, description="Train for at most this long (90s, 6m, 2h): the step count is fixed from the first "
        "steps' measured time, and the schedule completes at the end. The clock starts with the run: loading, "
        "the replay answers, validations and saving count.")
    short_budget: Literal["refuse", "train"] = Field(
        "refuse", description="When train.time_budget fits too few steps to teach anything: refuse (say so before "
        "training, with the shortest budget that would) or train anyway.")
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    gradient_checkpointing: Literal[False, "full", "selective"] = Field(
        False, description="Recompute activations in backward: full (every decoder layer; true means full), "
        "selective (every second layer: half the recompute, about half the activation memory saved), or false.",
        json_schema_extra=RESUME_MAY_CHANGE,
    )
    chunked_loss: bool = Field(
        True, description="Cross-entropy from hidden states in chunks, target tokens only (false: full logits)."
    )
    autocast: Literal["off", "bf16", "fp16"] = Field(
        "off", description="Mixed precision over an fp32 model: matmuls in bf16/fp16, weights and loss in fp32. "
        "bf16 pays off only on hardware with native bf16 (recent GPUs, CPUs with AVX512-BF16/AMX).",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (measured slower than without on the CPU; not run on "
        "CUDA in this project).")
    fused_kernels: Literal["off", "liger", "auto"] = Field(
        "off", description="liger: liger-kernel's fused RMSNorm/SwiGLU/RoPE on CUDA (pip install liger-kernel), "
        "undone after training; off when its model_type is not covered or it patches nothing. Experimental: it "
        "has never run on a GPU in this project. auto: the same as off (kept for older configs).",
    )
    offload_activations: bool = Field(
        False, description="Keep saved activations in CPU memory until backward (GPU only: trades PCIe time "
        "for GPU memory).",
    )
    seed: int = 42
    eval_every: int | None = Field(None, gt=0, description="Validation every N steps (always at the end).",
                                   json_schema_extra=RESUME_MAY_CHANGE)
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when this many validations in a row (train.eval_every) did not improve on "
        "the best; the best adapter is kept in best/ either way.")
    forgetting_every: int | None = Field(
        None, gt=0, description="Measure forgetting (loss increase and KL on the base's own answers to the "
        "general reference) every N steps.")
    forgetting_warn_pct: float = Field(
        10.0, gt=0, description="Warn when the forgetting verdict is not 'kept'; both loss measures (human-written "
        "text, the base's answers) count as kept up to this many percent.")
    forgetting_stop: bool = Field(False, description="Stop (with a checkpoint) when forgetting passes the warning.")
    diagnostics: bool = Field(True, description="Watch the run and say what looks wrong (flat or diverging "
                              "loss, spikes, over-fitting, ...).", json_schema_extra=RESUME_MAY_CHANGE)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", json_schema_extra=RESUME_MAY_CHANGE)
    memory_budget: str | None = Field(
        None, description="Fit micro-batch/accumulation/checkpointing to this memory (e.g. 24GB, 8GiB, auto: free "
        "device memory) before loading; refuse to start when nothing fits. Unset: auto on CUDA, off elsewhere; "
        "none: never fit.", json_schema_extra=RESUME_MAY_CHANGE,
    )
    threads: int | None = Field(None, gt=0, description="CPU threads for torch (default: all cores).",
                                json_schema_extra=RESUME_MAY_CHANGE)
    distributed: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="With several processes (desktune train --nproc N, or torchrun): ddp replicates the "
        "model on each; fsdp2 shards each decoder layer's weights across them (for a base that does not fit one "
        "device). One process ignores it.", json_schema_extra=RESUME_MAY_CHANGE)
    offload_params: bool = Field(
        False, description="fsdp2 only: keep the sharded parameters in CPU memory between uses (fits a bigger "
        "base for host memory and PCIe time).", json_schema_extra=RESUME_MAY_CHANGE)
    collective_timeout_s: float = Field(
        300.0, gt=0, description="Several processes: how long one waits for the others in a collective before the "
        "run stops (a rank that died or hangs).", json_schema_extra=RESUME_MAY_CHANGE)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, v: object) -> object:
        if v is True or (isinstance(v, str) and v.lower() in ("true", "yes", "on")):
            return "full"
        if v is None or (isinstance(v, str) and v.lower() in ("false", "no", "off", "none")):
            return False
        return v

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        if isinstance(v, int | float):
            v = f"{v}s"
        if isinstance(v, str):
            parse_duration(v)
        return v

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, v: object) -> object:
        if v is False or (isinstance(v, str) and v.strip().lower() in ("none", "off", "false", "no")):
            return "none"
        if isinstance(v, int | float):
            v = str(v)
        if isinstance(v, str) and v != "auto":
            parse_size(v)
        return v

    @property
    def samples_per_step(self) -> int:
        """Samples one optimizer step trains on (micro-batch x accumulation), however they split."""
        return self.micro_batch_size * self.grad_accum


_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90s' -> 90, '6m' -> 360, '2h' -> 7200, '1h30m' -> 5400 seconds."""
    if len(text) > 40:  # the patterns below backtrack in quadratic time on a long run of digits
        raise ValueError(f"'{_clip(text, 40)}' is not a duration (examples: 90s, 6m, 2h, 1h30m)")
    if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", text):  # a bare number is seconds
        text = f"{text.strip()}s"
    parts = re.findall(r"([0-9]*\.?[0-9]+)\s*([a-z]+)", text.strip().lower())
    if not parts or re.sub(r"[0-9.\s]|sec|min|[smh]", "", text.strip().lower()) or \
            any(unit not in _SECONDS for _, unit in parts):
        raise ValueError(f"'{text}' is not a duration (examples: 90s, 6m, 2h, 1h30m)")
    seconds = sum(float(n) * _SECONDS[unit] for n, unit in parts)
    if seconds <= 0:
        raise ValueError(f"'{text}' is not a positive duration")
    return seconds


class CheckpointConfig(_Strict):
    """When adapters are saved during training."""

    every: int | None = Field(None, gt=0, description="Save the adapter every N optimizer steps.",
                              json_schema_extra=RESUME_MAY_CHANGE)
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.",
                           json_schema_extra=RESUME_MAY_CHANGE)


class RunConfig(_Strict):
    """One fine-tuning run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output_dir: str = Field("runs", description="Runs are written to OUTPUT_DIR/RUN_NAME.",
                            json_schema_extra=RESUME_MAY_CHANGE)
    run_name: str | None = Field(None, description="Folder name of the run (default: a timestamp).",
                                 json_schema_extra=RESUME_MAY_CHANGE)

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in {".", ".."}):
            raise ValueError("must be a plain folder name")
        return v



# ---------------------------------------------------------------- loading and overrides


def _fields_at(path: tuple[str, ...]) -> list[str]:
    """Valid keys of the schema node at `path` (empty when it is a leaf)."""
    node: type[BaseModel] | None = RunConfig
    for part in path:
        if node is None or part not in node.model_fields:
            return []
        ann = node.model_fields[part].annotation
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(node.model_fields) if node is not None else []


def _all_dotted_keys(node: type[BaseModel] = RunConfig, prefix: str = "", *, resume_may_change: bool = False
                     ) -> list[str]:
    keys = []
    for name, field in node.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_dotted_keys(ann, f"{prefix}{name}.", resume_may_change=resume_may_change)
        elif not resume_may_change or field.json_schema_extra == RESUME_MAY_CHANGE:
            keys.append(f"{prefix}{name}")
    return keys


def resume_may_change() -> frozenset[str]:
    """Dotted keys a resumed run may change without changing what it computes (declared on the fields)."""
    return frozenset(_all_dotted_keys(resume_may_change=True))


def _suggest(key: str, path: tuple[str, ...]) -> str:
    valid = _fields_at(path)
    exact_elsewhere = [k for k in _all_dotted_keys() if k.rsplit(".", 1)[-1] == key]
    if exact_elsewhere:  # a right key in the wrong section, e.g. `lr` at the top level
        return f"did you mean '{exact_elsewhere[0]}'?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # maybe the key belongs to another section: search every dotted key
        dotted = _all_dotted_keys()
        close = difflib.get_close_matches(".".join((*path, key)), dotted, n=1, cutoff=0.6)
        if close:
            return f"did you mean '{close[0]}'?"
        return f"valid keys here: {', '.join(valid)}" if valid else ""
    return f"did you mean '{'.'.join((*path, close[0]))}'?"


def _default_at(loc: tuple[str, ...]) -> str | None:
    """The schema default of the key at `loc`, as YAML would write it (None when it has none)."""
    node: Any = RunConfig
    for i, part in enumerate(loc):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        if i < len(loc) - 1:
            node = field.annotation
        elif not field.is_required():
            value = field.get_default(call_default_factory=True)
            return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return None


_UNION_TAGS = {"constrained-float", "constrained-int", "float", "int", "str", "bool"}
# what to set instead, for keys whose valid values their default alone does not show
_VALUE_FIXES = {"lora.target_modules": "a list of the layers to adapt (such as q_proj, v_proj), or to 'all-linear' "
                                       "(the default: every linear layer but the output head)"}
_SHOWN_PROBLEMS = 5  # an error lists at most this many problems, then how many more
_EXCERPT = reprlib.Repr()  # the stdlib's bounded repr: never walks all of a huge (or alias-bomb) value
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxtuple, _EXCERPT.maxdict, _EXCERPT.maxset = 2, 4, 4, 4, 4
_EXCERPT.maxstring = _EXCERPT.maxother = 80


def _clip(text: str, limit: int = 80) -> str:
    """Text as an error quotes it: at most `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _excerpt(value: Any) -> str:
    """A value as an error quotes it: a repr of at most 80 characters, never the whole of a large value."""
    return _clip(_EXCERPT.repr(value))


def _format_validation_error(err: ValidationError, source: str) -> DesktuneError:
    lines = []
    fixes: dict[str, str] = {}
    bad_values: list[str] = []
    said: set[str] = set()
    for e in err.errors():
        # drop pydantic's union-branch tags such as 'list[str]', "literal['all-linear']" or 'constrained-float'
        loc = tuple(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
        dotted = _clip(".".join(loc))
        if dotted in said:  # a union's other branches failed too: the first branch's message says enough
            continue
        said.add(dotted)
        if e["type"] == "extra_forbidden":
            hint = _suggest(loc[-1], loc[:-1])
            lines.append(f"unknown key '{dotted}'" + (f" ({hint})" if hint else ""))
            fixes.setdefault("extra", "correct or remove the key (examples/demo.yaml shows every section)")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{dotted}'")
            fixes.setdefault("missing", f"add '{dotted}' to the config or pass -o {dotted}=...")
        else:
            got = e.get("input")
            said_msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]  # no "Value error, "
            lines.append(f"'{dotted}': {_clip(said_msg, 240)} (got {_excerpt(got)})")
            default = _default_at(loc)
            shown = dotted + (f" (default: {default})" if default is not None else "")
            if dotted in _VALUE_FIXES:
                fixes[dotted] = f"set {dotted} to {_VALUE_FIXES[dotted]}"
            elif shown not in bad_values:
                bad_values.append(shown)
    if bad_values:
        what = "a valid value" if len(bad_values) == 1 else "valid values"
        fixes["value"] = f"set {', '.join(bad_values[:_SHOWN_PROBLEMS])} to {what} in the config, or with -o KEY=VALUE"
    if len(lines) > _SHOWN_PROBLEMS:
        lines = [*lines[:_SHOWN_PROBLEMS], f"and {len(lines) - _SHOWN_PROBLEMS} more problems"]
    return DesktuneError("; ".join(lines), where=source, fix="; ".join(fixes.values()) or None)


def parse_value(text: str) -> Any:
    """Parse an override's value the way YAML would (numbers, booleans, null, lists), checked as a config is."""
    try:
        return _load_yaml(text, None)
    except yaml.YAMLError:
        return text


def _kind(value: Any) -> str:
    """A user-facing name for a YAML value's type."""
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def _not_a_section(value: Any, parts: list[str], item: str) -> DesktuneError:
    """The error of an override into `parts[:-1]`, which the config holds as a list or a single value."""
    section, key = ".".join(parts[:-1]), parts[-1]
    keys = f"'{section}:' then '  {key}: ...' on the next line"
    fix = (f"write the section's keys without '- ' ({keys}), then override it" if isinstance(value, list)
           else f"replace '{section}: {_clip(str(value))}' with a section of keys ({keys}), then override it")
    return DesktuneError(f"'{section}' is a {_kind(value)} in the config, not a section of keys, so the override "
                         "has nowhere to go", where=f"-o {item}", fix=fix)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw config mapping (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise DesktuneError(
                f"override '{item}' has no '='", where="-o", fix="write overrides as key=value, e.g. train.lr=1e-4"
            )
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in _fields_at(tuple(parts[:i])):
                hint = _suggest(part, tuple(parts[:i]))
                raise DesktuneError(
                    f"unknown key '{'.'.join(parts[: i + 1])}'" + (f" ({hint})" if hint else ""),
                    where=f"-o {item}",
                    fix="correct the key",
                )
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):  # replacing it would silently drop what the config says there
                raise _not_a_section(nxt, parts[: i + 2], item)
            node = nxt
        node[parts[-1]] = parse_value(value)
    return data


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a run config is a few KB (its data lives in files of their own)
MAX_CONFIG_VALUES = 10_000  # values once every alias is expanded: a run config holds a few hundred


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only, no code runs) that checks the parsed document before building it:
    a key given twice (YAML would keep the last one silently) or aliases that expand past MAX_CONFIG_VALUES
    (a "billion laughs" bomb) are refused. `source` is the file, None for an -o value."""

    source: str | None = None

    def place(self, mark: yaml.Mark) -> str:
        """Where a node starts, as an error names it."""
        return f"{self.source}:{mark.line + 1}" if self.source else f"column {mark.column + 1} of the -o value"

    def construct_document(self, node: yaml.Node) -> Any:
        paths = _key_paths(node)
        _refuse_duplicate_keys(self, node, paths)
        _refuse_alias_bombs(self, node, paths)
        return super().construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _key_paths(root: yaml.Node) -> dict[int, str]:
    """The dotted key path where each distinct node first appears (an alias shares its anchor's node)."""
    paths: dict[int, str] = {}
    stack = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):  # reversed onto the stack: visited in document order
                name = _clip(str(key.value)) if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((value, f"{path}.{name}" if path else name))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(node.value))))
    return paths


def _refuse_duplicate_keys(loader: _ConfigLoader, root: yaml.Node, paths: dict[int, str]) -> None:
    for node in (n for n in _iter_nodes(root) if isinstance(n, yaml.MappingNode)):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if (key.tag, key.value) in first:
                name, section = _clip(str(key.value)), paths[id(node)]
                dotted, under = (f"{section}.{name}", f" under '{section}'") if section else (name, "")
                again = loader.place(key.start_mark)
                raise DesktuneError(f"duplicate key '{dotted}' at {loader.place(first[key.tag, key.value].start_mark)}"
                                    f" and again at {again} (YAML would keep the last one silently)",
                                    where=again, fix=f"keep one '{name}'{under} and delete the other")
            first[key.tag, key.value] = key


def _iter_nodes(root: yaml.Node) -> list[yaml.Node]:
    """Each distinct node of a document once (an alias shares its anchor's node)."""
    seen: dict[int, yaml.Node] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen[id(node)] = node
            stack.extend(_children(node))
    return list(seen.values())


def _refuse_alias_bombs(loader: _ConfigLoader, root: yaml.Node, paths: dict[int, str]) -> None:
    """Count the values of the document with every alias expanded, on the shared nodes (so never expanding it),
    and refuse past MAX_CONFIG_VALUES or a value that contains itself."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose count is in progress: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > MAX_CONFIG_VALUES:
                key = f"'{paths[id(node)]}'" if paths[id(node)] else "the document"
                raise DesktuneError(
                    f"{key} holds more than {MAX_CONFIG_VALUES:,} values once its aliases (*name) are expanded; "
                    "a run config holds a few hundred", where=loader.place(node.start_mark),
                    fix="write the values out without aliases that repeat lists, or pass the run's own config")
        elif id(node) in open_:
            raise DesktuneError(f"'{paths[id(node)]}' contains itself through an alias (*name)",
                                where=loader.place(node.start_mark), fix="remove the alias inside its own anchor")
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node))


def _load_yaml(text: str, source: str | None) -> Any:
    """The YAML document in `text`, built by _ConfigLoader (`source`: the file, None for an -o value)."""
    loader = _ConfigLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise DesktuneError("config file not found", where=str(path), fix="check the path")
    if path.is_dir():
        raise DesktuneError("is a folder, not a YAML config", where=str(path), fix="pass the .yaml file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # never more: a huge file (or /dev/zero) is refused, not read
        if len(data) > MAX_CONFIG_BYTES:
            raise DesktuneError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB; a run config is a few KB",
                                where=str(path), fix="pass the run's YAML config (data goes in its own file, "
                                "named by data.train)")
        raw = _load_yaml(data.decode("utf-8"), str(path))
    except RecursionError as e:
        raise DesktuneError("nested too deeply to be a run config", where=str(path),
                            fix="pass the run's YAML config (sections of keys, a few levels deep)") from e
    except OSError as e:
        raise DesktuneError(f"cannot read the config file: {e.strerror or e}", where=str(path),
                            fix=f"make it readable (chmod u+r {path}), or pass a config you can read") from e
    except UnicodeDecodeError as e:
        raise DesktuneError("not a text file", where=str(path), fix="pass a YAML config") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DesktuneError(f"invalid YAML: {problem}", where=where, fix="correct the YAML syntax") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DesktuneError(
            f"the config must be a mapping of sections, not {'a list' if isinstance(raw, list) else 'a single value'}",
            where=str(path),
            fix="write YAML sections such as 'data:' with 'train: FILE' under it (see examples/demo.yaml)",
        )
    return raw


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative data paths in a config file relative to the file's folder, when they exist there."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "val"):
            value = data.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                candidate = base / value
                if candidate.exists() and not Path(value).exists():
                    data[key] = str(candidate)
    return raw


def load_config(
    source: str | Path | dict[str, Any] | RunConfig | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Build a RunConfig from a YAML path, a mapping or an existing config, then apply overrides."""
    if isinstance(source, RunConfig):
        raw: dict[str, Any] = source.model_dump()
        name = "config"
    elif isinstance(source, dict):
        raw = dict(source)
        name = "config"
    elif source is None:
        raw, name = {}, "config"
    else:
        path = Path(source)
        raw = resolve_paths(_read_yaml(path), path.parent)
        name = str(path)
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise _format_validation_error(e, name) from e


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
