"""Shared parts of the benchmarks against the standard TRL + PEFT recipe (vs_standard_recipe.py, gpu_qlora.py).

Data (real chitchat conversations), the one validation loss every system is scored with, model FLOPs, the
matmul peak, tiny random Llamas, the training workers (TRL + PEFT in any layout / checkpointing / loss, desktune)
that each run in their own process so that peak RSS / peak VRAM belong to one system, and a check of TRL's
padding-free rows under the attention in use.

Shared hyper-parameters: LoRA r 16, alpha 32, dropout 0.05 on q,k,v,o; micro-batch 2 x accumulation 4; lr 2e-4,
linear schedule without warmup; weight decay 0; gradient clipping 1.0; AdamW betas (0.9, 0.999), eps 1e-8;
1 epoch; seed 42; samples in file order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
MICRO, ACCUM, LR, SEED, MAX_GRAD_NORM = 2, 4, 2e-4, 42, 1.0
SYSTEMS = ("recipe", "trl_best", "desktune")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


# ---------------------------------------------------------------- data


def chitchat_path() -> Path:
    """dataset.json inside the installed `chitchat-dataset` wheel (the package itself is not imported)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the chitchat-dataset package is not installed (pip install chitchat-dataset)")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def chitchat_conversations() -> list[list[dict[str, str]]]:
    """Every usable conversation as alternating user/assistant messages, in the file's key order.

    A turn is one speaker's consecutive utterances joined by newlines; the first speaker is the user. A trailing
    user turn is dropped (nothing answers it). Degenerate conversations are dropped: an empty turn, two turns in
    a row by the same speaker, or no assistant turn.
    """
    raw = json.loads(chitchat_path().read_text(encoding="utf-8"))
    out = []
    for key in sorted(raw):
        turns = raw[key].get("messages") or []
        senders = [t[0]["sender"] if t else None for t in turns]
        texts = ["\n".join(u.get("text", "").strip() for u in t if u.get("text", "").strip()) for t in turns]
        if not turns or any(not s for s in texts) or any(a == b for a, b in itertools.pairwise(senders)):
            continue
        if len(texts) % 2:
            texts = texts[:-1]
        if len(texts) < 2:
            continue
        out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)])
    return out


def render(tokenizer: Any, messages: list[dict[str, str]], *, generation: bool = False) -> str:
    """The chat template's text of a conversation."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation after chat templating (no extra special tokens), as both trainers see it."""
    return list(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])


@dataclass
class Corpus:
    """The conversations a benchmark trains and validates on, with their templated token counts."""

    train: list[list[dict[str, str]]]
    val: list[list[dict[str, str]]]
    train_lengths: list[int]
    val_lengths: list[int]
    n_usable: int  # usable conversations in the dataset
    n_too_long: int  # drawn but longer than max_len, skipped
    n_assistant: int = 0  # assistant-reply positions of the training conversations (assistant_positions)

    @property
    def train_tokens(self) -> int:
        return sum(self.train_lengths)


def select_conversations(tokenizer: Any, n_train: int, n_val: int, max_len: int, seed: int = 0) -> Corpus:
    """Draw n_train + n_val conversations in a seeded random order, skipping those longer than max_len tokens."""
    pool = chitchat_conversations()
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    picked, lengths, too_long = [], [], 0
    for i in order:
        n = len(template_ids(tokenizer, pool[i]))
        if n > max_len:
            too_long += 1
            continue
        picked.append(pool[i])
        lengths.append(n)
        if len(picked) == n_train + n_val:
            break
    if len(picked) < n_train + n_val:
        raise SystemExit(f"only {len(picked)} conversations fit in {max_len} tokens")
    n_assistant = sum(len(assistant_positions(tokenizer, conv)[1]) for conv in picked[:n_train])
    return Corpus(picked[:n_train], picked[n_train:], lengths[:n_train], lengths[n_train:], len(pool), too_long,
                  n_assistant)


def write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    """{"messages": [...]} lines, in order."""
    with path.open("w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": conv}) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def length_summary(lengths: list[int]) -> str:
    s = sorted(lengths)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return (f"{len(s)} samples, {sum(s)} tokens: min {s[0]}, median {q(0.5)}, p90 {q(0.9)}, max {s[-1]}, "
            f"mean {sum(s) / len(s):.0f}")


# ---------------------------------------------------------------- the shared validation loss


def assistant_positions(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids, assistant-reply positions): each assistant turn's content tokens plus its end-of-turn token.

    A turn starts where the tokens of the conversation before it, rendered with the generation prompt, end (the
    prefix must be a token prefix of the whole conversation); it ends at the first eos token at or after that.
    """
    ids = template_ids(tokenizer, messages)
    eos = tokenizer.eos_token_id
    scored: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix_text = render(tokenizer, messages[:i], generation=True)
        prefix = list(tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
        if ids[: len(prefix)] != prefix:
            raise ValueError("the chat template is not token-prefix stable for this conversation")
        start = len(prefix)
        end = ids.index(eos, start)
        scored.extend(range(start, end + 1))
    return ids, scored


@dataclass
class ValLoss:
    """Mean next-token cross-entropy on assistant-reply tokens and on every token (position 0 excluded)."""

    assistant: float
    all: float
    n_assistant: int
    n_all: int


@torch.no_grad()
def validation_loss(model: Any, samples: list[tuple[list[int], list[int]]], device: torch.device) -> ValLoss:
    """Full logits in fp32, one sample at a time (no padding), summed over scored tokens, divided by their count.

    `samples`: (ids, assistant positions) pairs; a position p is scored from the logits at p - 1.
    """
    was_training = model.training
    model.eval()
    a_sum = all_sum = 0.0
    a_n = all_n = 0
    for ids, positions in samples:
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        all_sum += float(ce.sum())
        all_n += ce.numel()
        if positions:
            a_sum += float(ce[torch.tensor(positions, device=device) - 1].sum())
            a_n += len(positions)
        del logits, ce
    model.train(was_training)
    return ValLoss(a_sum / max(a_n, 1), all_sum / max(all_n, 1), a_n, all_n)


def load_for_eval(model_dir: str, adapter_dir: str | None, dtype: torch.dtype, device: torch.device) -> Any:
    """A freshly loaded base (sdpa attention) in `dtype`, with the PEFT adapter on top when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model


# ---------------------------------------------------------------- FLOPs and the machine's peak


@dataclass(frozen=True)
class Arch:
    """What the FLOP count needs from a decoder-only model with LoRA on q,k,v,o."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    vocab: int
    p_frozen: int  # weights of every linear layer of the decoder layers (the output head and embeddings excluded)
    p_lora: int  # LoRA A and B weights


def arch_of(config: Any, r: int = LORA_R) -> Arch:
    """Arch of a transformers Llama-like config, LoRA rank r on q,k,v,o."""
    h, heads = config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    q, k = h * heads * hd, h * kv * hd
    per_layer = q + 2 * k + heads * hd * h + 3 * h * config.intermediate_size
    lora = r * ((h + heads * hd) + 2 * (h + kv * hd) + (heads * hd + h))
    return Arch(h, config.num_hidden_layers, heads, hd, config.vocab_size, per_layer * config.num_hidden_layers,
                lora * config.num_hidden_layers)


FLOP_FORMULA = ("per sample of length l: 4*P_frozen*l + 6*P_lora*l + 6*n_layers*l^2*(n_heads*head_dim) "
                "+ 4*V*hidden*n_scored (frozen decoder linears forward + input gradient; LoRA forward + both "
                "gradients; causal attention; output head forward + input gradient on the positions the system's "
                "loss scores); recomputation not counted")


def model_flops(arch: Arch, lengths: list[int], n_scored: int) -> float:
    """Model FLOPs of one pass over samples of these lengths, the head scoring n_scored positions in all."""
    body = sum(4 * arch.p_frozen * n + 6 * arch.p_lora * n + 6 * arch.layers * n * n * arch.heads * arch.head_dim
               for n in lengths)
    return float(body + 4 * arch.vocab * arch.hidden * n_scored)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n x n x n matmuls in `dtype` (torch's default threads)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        c = a @ b
        sync(device)
        if i:  # the first is a warm-up
            best = min(best, time.perf_counter() - t0)
        del c
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process), to tell other load apart."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def foreign_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Average CPU cores other processes kept busy between two snapshots (0 on a quiet machine)."""
    wall = max(b[0] - a[0], 1e-9)
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _status_kib(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PhaseRss:
    """Peak resident set size of this process from `start()` to `stop()`: Linux's high-water mark (VmHWM), reset
    at the start by writing 5 to /proc/self/clear_refs. Where that is not possible, the process's whole peak
    (ru_maxrss, loading included) and `exact` False."""

    def __init__(self) -> None:
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.exact = False

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.start_bytes = _status_kib("VmRSS")

    def stop(self) -> None:
        hwm = _status_kib("VmHWM") if self.exact else None
        self.peak_bytes = hwm if hwm is not None else peak_rss_bytes()
        self.exact = hwm is not None

    def as_dict(self) -> dict[str, Any]:
        return {"train_rss_bytes": self.peak_bytes, "rss_start_bytes": self.start_bytes, "rss_exact": self.exact}


# ---------------------------------------------------------------- models


def llama_config(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 tokenizer: Any, max_positions: int = 8192) -> Any:
    """A Llama-3-style config (untied head, rope theta 500000) with the tokenizer's special token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)


def make_tiny_llama(path: Path, tokenizer_dir: str | Path, dtype: torch.dtype, *, hidden: int = 512, layers: int = 4,
                    heads: int = 8, kv_heads: int = 2, intermediate: int = 1792, vocab: int = 128_256,
                    seed: int = 0) -> Path:
    """Save a random Llama-3-shaped model (128,256-token vocabulary by default) with the given tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = llama_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, tokenizer=tok)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------- workers


def run_worker(script: str | Path, spec: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Run `script --worker SPEC.json` in a fresh process and return the JSON it writes to spec['result']."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", prefix="worker-")
    os.close(fd)
    spec = {**spec, "result": spec_path + ".out"}
    Path(spec_path).write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = Path(spec["result"])
    try:
        proc = subprocess.run([sys.executable, str(script), "--worker", spec_path], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"worker {spec.get('kind')}/{spec.get('system')} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(result.read_text(encoding="utf-8"))
    finally:
        Path(spec_path).unlink(missing_ok=True)
        result.unlink(missing_ok=True)


def worker_main(spec_path: str) -> int:
    """Entry point of a worker process: train one system, evaluate adapters, or check padding-free attention;
    writes the result JSON."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    from desktune.models.loading import quiet_transformers
    from desktune.models.quantize import import_torchao_quietly

    quiet_transformers()
    import_torchao_quietly()
    if spec["kind"] == "train":
        trainer = spec.get("trainer") or ("desktune" if spec["system"] == "desktune" else "trl")
        out = desktune_train(spec) if trainer == "desktune" else trl_train(spec)
        out["threads"] = torch.get_num_threads()
    elif spec["kind"] == "eval":
        out = eval_adapters(spec)
    elif spec["kind"] == "pf_check":
        out = padding_free_check(spec)
    else:
        raise SystemExit(f"unknown worker kind {spec['kind']}")
    Path(spec["result"]).write_text(json.dumps(out), encoding="utf-8")
    return 0


def _device(spec: dict[str, Any]) -> torch.device:
    return torch.device(spec.get("device", "cpu"))


def eval_adapters(spec: dict[str, Any]) -> dict[str, Any]:
    """Validation losses of the base and of each adapter in spec['adapters'] ({name: dir}), each on a fresh base."""
    from transformers import AutoTokenizer

    device, dtype = _device(spec), NAME_DTYPES[spec["dtype"]]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    samples = [assistant_positions(tok, row["messages"]) for row in read_jsonl(spec["val_file"])]
    out = {}
    for name, adapter in {"base": None, **spec["adapters"]}.items():
        model = load_for_eval(spec["model_dir"], adapter, dtype, device)
        out[name] = asdict(validation_loss(model, samples, device))
        del model
    return out


@torch.no_grad()
def padding_free_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Does spec['attn'] keep the samples of a TRL padding-free batch apart (one flattened row, no attention mask,
    position ids restarting per sample: what padding_free and BFD packing feed the model)?

    The base model on the first two training conversations, in the run's dtype and in fp32: max |logit difference|
    of the second sample against it run alone ('pf'), beside the same for a plain concatenation ('leak', what
    attention across samples gives). Valid when pf is below a tenth of leak in both dtypes.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    ids = [template_ids(tok, row["messages"]) for row in read_jsonl(spec["train_file"])[:2]]
    out: dict[str, Any] = {"attn": spec.get("attn", "sdpa"), "lengths": [len(x) for x in ids]}
    for name in dict.fromkeys([spec["dtype"], "fp32"]):
        out[name] = _pf_diffs(spec, tok, ids, NAME_DTYPES[name])
    out["valid"] = all(out[n]["pf"] < 0.1 * out[n]["leak"] for n in dict.fromkeys([spec["dtype"], "fp32"]))
    return out


def _pf_diffs(spec: dict[str, Any], tok: Any, ids: list[list[int]], dtype: torch.dtype) -> dict[str, float]:
    """{'pf', 'leak'}: see padding_free_check."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    device = _device(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                 attn_implementation=spec.get("attn", "sdpa"))
    model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)([{"input_ids": x} for x in ids])
    batch.pop("labels")

    def logits(**kw: Any) -> torch.Tensor:
        kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
        return model(**kw, use_cache=False).logits[0].float()

    n0 = len(ids[0])
    alone = logits(input_ids=torch.tensor([ids[1]]))
    flat = logits(**batch)[n0:]
    plain = logits(input_ids=torch.tensor([ids[0] + ids[1]]))[n0:]
    return {"pf": float((flat - alone).abs().max()), "leak": float((plain - alone).abs().max())}


def desktune_config(spec: dict[str, Any]) -> Any:
    """The desktune RunConfig of a worker spec: desktune's defaults but for the shared hyper-parameters."""
    import desktune

    raw = {
        "model": {"name": spec["model_dir"], "quant": spec.get("quant", "none")},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target_modules": QKVO},
        "data": {"train": spec["train_file"], "shuffle": False, "max_seq_len": spec["max_len"],
                 "train_on": spec.get("train_on", "assistant"), "replay": 0.0,  # no replay samples: same data
                 "val_fraction": 0.0},  # no rows held out: every system trains on the same rows
        "train": {"micro_batch_size": MICRO, "grad_accum": ACCUM, "lr": LR, "scheduler": "linear",
                  "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM, "epochs": 1,
                  "seed": SEED, "max_steps": spec.get("max_steps")},
        "checkpoint": {"every": None},
        "output_dir": spec["out_dir"],
        "run_name": spec["system"],
    }
    if spec.get("memory_budget"):  # 'none': micro-batch, accumulation and checkpointing exactly as given
        raw["train"]["memory_budget"] = spec["memory_budget"]
    return desktune.load_config(raw)


def desktune_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with desktune: `setup` then `fit` (what desktune.train does), PeakTracker around `fit` when
    spec['track'] or on CUDA (where it only reads the allocator's peak); PhaseRss around `fit`."""
    from desktune.memory.measure import PeakTracker, model_tensors
    from desktune.runs import EventRecord, RunDir, TrainRecord, read_records, records_of
    from desktune.training.loop import fit, setup

    cfg = desktune_config(spec)
    device = _device(spec)
    track = spec.get("track") or device.type == "cuda"
    run = setup(cfg, quiet=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracker = PeakTracker(device, model_tensors(run.model)) if track else contextlib.nullcontext()
    phase = PhaseRss()
    phase.start()
    snap0 = cpu_snapshot()
    with tracker:
        result = fit(run)
    snap1 = cpu_snapshot()
    phase.stop()
    rss = peak_rss_bytes()
    recs = read_records(RunDir(result.run_dir).metrics)
    steps = records_of(recs, TrainRecord)
    out = {"system": spec["system"], "train_s": result.train_s, "steps": result.steps,
           "final_loss": result.train_losses[-1], "adapter_dir": str(result.adapter_dir),
           "tokens": sum(r.tokens for r in steps), "n_scored": sum(r.target_tokens for r in steps),
           "step_s": [r.step_s for r in steps], "step_tokens": [r.tokens for r in steps],
           "dtype": DTYPE_NAMES.get(run.loaded.hardware.dtype, str(run.loaded.hardware.dtype)),
           "micro_batch": run.cfg.train.micro_batch_size, "grad_accum": run.cfg.train.grad_accum,
           "peak_bytes": tracker.peak_bytes if track else None,
           "reserved_bytes": int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None,
           "rss_bytes": rss, **phase.as_dict(), "other_cores": foreign_cores(snap0, snap1),
           "gradient_checkpointing": bool(getattr(run.model.get_base_model(), "is_gradient_checkpointing", False)),
           "truncated": sum(1 for e in records_of(recs, EventRecord) if e.name == "truncated")}
    if spec.get("val_ids_file"):
        out["val"] = asdict(validation_loss(run.model, _val_ids(spec), device))
    return out


def _val_ids(spec: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """Held-out pre-tokenized rows scored on every token."""
    return [(row["input_ids"], []) for row in read_jsonl(spec["val_ids_file"])]


# ---------------------------------------------------------------- the TRL worker

# What each TRL system name means unless the spec says otherwise: layout (padded | padding_free | packed),
# gc (gradient checkpointing; None: TRL's default, on) and loss (all | assistant).
TRL_DEFAULTS: dict[str, dict[str, Any]] = {
    "recipe": {"layout": "padded", "gc": None, "loss": "all"},
    "trl_best": {"layout": "packed", "gc": False, "loss": "all"},
}
LAYOUT_ARGS: dict[str, dict[str, Any]] = {
    "padded": {},
    # TRL refuses padding_free without packing while max_length is set; every benchmark sample fits max_len
    "padding_free": {"padding_free": True, "max_length": None},
    "packed": {"packing": True, "padding_free": True},  # BFD packing into rows of max_length
}

# SmolLM2-Instruct's chat template with TRL's {% generation %} markers around each assistant turn's content and its
# <|im_end|>: it renders the same text (checked on every row), so TRL's assistant_only_loss masks the positions
# desktune trains on (TRL ships no training template for it).
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def trl_options(spec: dict[str, Any]) -> dict[str, Any]:
    """layout, gc and loss of a TRL worker spec (defaults by system name, see TRL_DEFAULTS)."""
    base = TRL_DEFAULTS.get(spec["system"], {"layout": "padded", "gc": False, "loss": "all"})
    return {k: spec.get(k, v) for k, v in base.items()}


def assistant_template(tokenizer: Any, rows: list[dict[str, Any]]) -> str:
    """Give the tokenizer a chat template with generation markers for TRL's assistant_only_loss; returns a note.

    Kept as is when it has markers; else SMOLLM2_TRAINING_TEMPLATE when it renders every row identically."""
    from trl.chat_template_utils import has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return "the tokenizer's own template (has generation markers)"
    same = all(tokenizer.apply_chat_template(r["messages"], tokenize=False)
               == tokenizer.apply_chat_template(r["messages"], tokenize=False, chat_template=SMOLLM2_TRAINING_TEMPLATE)
               for r in rows)
    if not same:
        raise SystemExit("assistant-only TRL loss: the model's chat template is not SmolLM2's; no marked template")
    tokenizer.chat_template = SMOLLM2_TRAINING_TEMPLATE
    return "SmolLM2's template with {% generation %} markers (renders every row identically)"


def mask_check(tokenizer: Any, rows: list[dict[str, Any]], prepared: Any) -> dict[str, Any]:
    """Do TRL's prepared labels train exactly the shared assistant positions (recipe_common.assistant_positions)?"""
    same = n = 0
    for row, ids, labels in zip(rows, prepared["input_ids"], prepared["labels"], strict=True):
        ref_ids, positions = assistant_positions(tokenizer, row["messages"])
        mine = [i for i, v in enumerate(labels) if v != -100]
        same += list(ids) == ref_ids and mine == positions
        n += 1
    return {"rows": n, "identical": same}


def trl_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """The base model as TRL gets it: in the run's dtype, spec['attn'] attention; NF4 when spec['quant'] is nf4."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if spec.get("quant") == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                 attn_implementation=spec.get("attn", "sdpa"), **kwargs)
    if "quantization_config" not in kwargs:
        model.to(device)
    return model


def sft_config(spec: dict[str, Any], opts: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """The SFTConfig: the shared hyper-parameters, the run's dtype, the layout, checkpointing and loss in opts."""
    from trl import SFTConfig

    extra: dict[str, Any] = {"max_length": spec["max_len"], **LAYOUT_ARGS[opts["layout"]]}
    if opts["gc"] is not None:
        extra["gradient_checkpointing"] = opts["gc"]
    if opts["loss"] == "assistant":
        extra["assistant_only_loss"] = True
    return SFTConfig(
        output_dir=str(Path(spec["out_dir"]) / spec["system"]), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM, learning_rate=LR, num_train_epochs=1, max_steps=spec.get("max_steps") or -1,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, seed=SEED,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        train_sampling_strategy="sequential", **extra)


@dataclass
class StepMeter:
    """What a TRL run did per optimizer step: seconds (step begin to step end), tokens fed, positions scored."""

    step_s: list[float]
    step_tokens: list[int]
    tokens: int = 0
    scored: int = 0


def counting_trainer(base: type, meter: StepMeter) -> type:
    """`base` (SFTTrainer) counting each micro-batch's real tokens and scored positions before TRL's own loss."""

    class Counting(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
            mask = inputs.get("attention_mask")
            meter.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            meter.scored += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *a, **kw)

    return Counting


def trl_clock(spec: dict[str, Any], device: torch.device, meter: StepMeter) -> Any:
    """A TrainerCallback timing every optimizer step into `meter`, PhaseRss from train begin to train end, and a
    PeakTracker over the same span when spec['track'] or on CUDA."""
    from transformers import TrainerCallback

    from desktune.memory.measure import PeakTracker, model_tensors

    class Clock(TrainerCallback):
        t0: float | None = None
        t1: float | None = None
        tracker: PeakTracker | None = None

        def __init__(self) -> None:
            self.phase = PhaseRss()

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                           **kw: Any) -> None:
            self.phase.start()
            if spec.get("track") or device.type == "cuda":
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                self.tracker = PeakTracker(device, model_tensors(model, optimizer))
                self.tracker.__enter__()

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            sync(device)
            snap = cpu_snapshot()
            if self.t0 is None:
                self.snap0, self.t0 = snap, snap[0]
            self.begin, self.tokens0 = snap[0], meter.tokens

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            sync(device)
            self.snap1 = cpu_snapshot()
            self.t1 = self.snap1[0]
            meter.step_s.append(self.t1 - self.begin)
            meter.step_tokens.append(meter.tokens - self.tokens0)

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            if self.tracker is not None:
                self.tracker.__exit__(None, None, None)
            self.phase.stop()

    return Clock()


def trl_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL SFTTrainer + PEFT LoRA, TRL's own fused chunked log-prob loss; trl_options(spec) picks the
    layout, checkpointing and loss ('recipe': TRL defaults; 'trl_best': packing, padding-free, no checkpointing).
    spec['quant'] nf4: a bitsandbytes 4-bit NF4 base; spec['attn']: attention.

    train_s: first optimizer step's begin to last one's end; step_s: each step's begin to end (batch fetching and
    logging between steps excluded, as desktune's step times exclude them).
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    device, dtype, opts = _device(spec), NAME_DTYPES[spec["dtype"]], trl_options(spec)
    model = trl_model(spec, device, dtype)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = read_jsonl(spec["train_file"])
    template = assistant_template(tok, rows) if opts["loss"] == "assistant" else None
    meter = StepMeter([], [])
    clock = trl_clock(spec, device, meter)
    peft_cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=QKVO,
                          bias="none", task_type="CAUSAL_LM")
    trainer = counting_trainer(SFTTrainer, meter)(
        model=model, args=sft_config(spec, opts, device, dtype), train_dataset=Dataset.from_list(rows),
        processing_class=tok, peft_config=peft_cfg, callbacks=[clock])
    prepared = trainer.train_dataset
    masks = mask_check(tok, rows, prepared) if template and opts["layout"] != "packed" else None
    tokens = sum(len(ids) for ids in prepared["input_ids"])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter_dir = Path(spec["out_dir"]) / spec["system"] / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    out = {"system": spec["system"], **opts, "train_s": clock.t1 - clock.t0, "steps": trainer.state.global_step,
           "micro_batch": MICRO, "grad_accum": ACCUM,
           "step_s": meter.step_s, "step_tokens": meter.step_tokens, "n_scored": meter.scored, "dtype": spec["dtype"],
           "final_loss": losses[-1], "adapter_dir": str(adapter_dir), "tokens": tokens, "fed_tokens": meter.tokens,
           "rows": len(prepared), "peak_bytes": clock.tracker.peak_bytes if clock.tracker else None,
           "gradient_checkpointing": bool(getattr(trainer.model.get_base_model(), "is_gradient_checkpointing", False)),
           "reserved_bytes": int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None,
           "rss_bytes": peak_rss_bytes(), **clock.phase.as_dict(), "template": template, "mask_check": masks,
           "other_cores": foreign_cores(clock.snap0, clock.snap1),
           "train_runtime": next((h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h),
                                 None)}
    if spec.get("val_ids_file"):
        out["val"] = asdict(validation_loss(trainer.model, _val_ids(spec), device))
    return out
