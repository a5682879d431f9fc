from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers

from desktune.config import ModelConfig
from desktune.errors import DesktuneError
from desktune.hardware import Hardware, pick_dtype
from desktune.models.loading import check_safetensors, load_model, load_tokenizer, resolve_source

CPU32 = Hardware(device=torch.device("cpu"), dtype=torch.float32)


def test_local_folder_loads_frozen(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir)), CPU32)
    assert loaded.base_path == str(tiny_model_dir)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32 and loaded.tokenizer.pad_token_id is not None


def test_offline_hub_id_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DesktuneError) as e:
        load_model(ModelConfig(name="some-org/not-a-cached-model"), CPU32)
    msg = str(e.value)
    assert "cannot be reached" in msg and "model.name" in msg and "local-dir" in msg


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "without config.json"),
        (lambda p: (p / "w.bin").write_text("x") and p / "w.bin", "not a .gguf model"),
    ],
)
def test_bad_model_paths(tmp_path, make, expected):
    with pytest.raises(DesktuneError, match=expected):
        resolve_source(str(make(tmp_path)))


def test_corrupted_config_and_truncated_weights(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(DesktuneError, match=r"config.json is not valid JSON"):
        load_model(ModelConfig(name=str(broken)), CPU32)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DesktuneError, match="could not load the model"):
        load_model(ModelConfig(name=str(truncated)), CPU32)


def test_precision_rules():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) in (torch.bfloat16, torch.float32)  # never fp16 on a CPU
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(DesktuneError, match="fp16 on the CPU"):
        pick_dtype("fp16", cpu)


# ---------------------------------------------------------------- errors keep their cause; bugs stay bugs


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


def _no_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    def called(*args: object, **kwargs: object) -> None:
        pytest.fail("from_pretrained ran: the config check should have refused the folder first")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", called)


def test_damaged_safetensors_keeps_the_library_error_as_cause(tmp_path):
    from safetensors import SafetensorError

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{abc}")
    with pytest.raises(DesktuneError, match="damaged or incomplete") as e:
        check_safetensors(bad, "model", fix="copy it again")
    assert isinstance(e.value.__cause__, SafetensorError)


def test_unknown_architecture_is_refused_from_config_json(tiny_model_dir, tmp_path, monkeypatch):
    model = _copy_with_config(tiny_model_dir, tmp_path / "m", model_type="no-such-arch")
    _no_from_pretrained(monkeypatch)
    with pytest.raises(DesktuneError, match="does not know the architecture 'no-such-arch'") as e:
        load_model(ModelConfig(name=str(model)), CPU32)
    assert e.value.where == str(model) and "pip install -U transformers" in e.value.fix


def test_config_without_model_type_is_refused_from_config_json(tiny_model_dir, tmp_path, monkeypatch):
    model = _copy_with_config(tiny_model_dir, tmp_path / "m", model_type=None)
    _no_from_pretrained(monkeypatch)
    with pytest.raises(DesktuneError, match="has no 'model_type'") as e:
        load_model(ModelConfig(name=str(model)), CPU32)
    assert e.value.where == str(model / "config.json")


def test_a_bug_inside_from_pretrained_is_not_a_user_error(tiny_model_dir, monkeypatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in the loader")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(TypeError, match="a bug in the loader"):
        load_model(ModelConfig(name=str(tiny_model_dir)), CPU32)


def test_a_library_refusal_still_becomes_a_user_error_with_its_cause(tiny_model_dir, monkeypatch):
    def refuses(*args: object, **kwargs: object) -> None:
        raise ValueError("weights and config disagree")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuses)
    with pytest.raises(DesktuneError, match="could not load the model: weights and config disagree") as e:
        load_model(ModelConfig(name=str(tiny_model_dir)), CPU32)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_hub_error_that_is_not_offline_is_not_called_offline(monkeypatch):
    def missing(*args: object, **kwargs: object) -> None:  # what transformers says for a repository not found
        raise OSError("some-org/nope is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(DesktuneError) as e:
        load_model(ModelConfig(name="some-org/nope"), CPU32)
    assert "cannot be reached" not in str(e.value) and "not a valid model identifier" in str(e.value)


def test_offline_hub_error_keeps_its_cause(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DesktuneError, match="cannot be reached") as e:
        load_model(ModelConfig(name="some-org/not-a-cached-model"), CPU32)
    assert isinstance(e.value.__cause__, OSError)


def test_damaged_tokenizer_json_keeps_its_cause_and_a_bug_propagates(tiny_model_dir, tmp_path, monkeypatch):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    tok = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": {"type": "Nope"}}))
    with pytest.raises(DesktuneError, match="could not load the tokenizer") as e:
        load_tokenizer(str(model))
    assert type(e.value.__cause__) is Exception  # how the tokenizers library reports a tokenizer.json it cannot read

    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("a bug in the tokenizer loader")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(AttributeError, match="a bug in the tokenizer loader"):
        load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize(
    ("content", "cause"),
    [(b"not a gguf file at all\n" * 20, ValueError), (b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 4, struct.error)],
)
def test_damaged_gguf_keeps_its_cause(tmp_path, monkeypatch, content, cause):
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    with pytest.raises(DesktuneError, match="could not read the GGUF file") as e:
        resolve_source(str(gguf))
    assert isinstance(e.value.__cause__, cause)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_a_bug_inside_the_gguf_reader_is_not_a_user_error(tmp_path, monkeypatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in the GGUF reader")

    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(TypeError, match="a bug in the GGUF reader"):
        resolve_source(str(gguf))


class _Stop(OSError):
    """Raised by a mocked from_pretrained: the test ends once the download would start."""


def _hub(monkeypatch, *, offline: bool, cache: dict[str, Path], sizes: dict[str, int] | None = None,
         events: list[str] | None = None) -> list[str]:
    """Mock huggingface_hub (offline mode, its cache, model_info) and from_pretrained; no network is used.

    Returns the event list: what `log` said and when from_pretrained was called, in order."""
    import huggingface_hub
    from huggingface_hub.hf_api import RepoSibling

    events = [] if events is None else events

    def model_info(repo_id: str, **kwargs: object) -> object:
        events.append(f"model_info timeout={kwargs.get('timeout')}")
        if sizes is None:
            raise huggingface_hub.errors.HfHubHTTPError("no connection")
        return type("Info", (), {"siblings": [RepoSibling(rfilename=n, size=s) for n, s in sizes.items()]})()

    def from_pretrained(source: str, **kwargs: object) -> None:
        events.append(f"from_pretrained {source}")
        raise _Stop("stop here")

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: offline)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: str(cache[filename]) if filename in cache else None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return events


def test_a_hub_download_is_announced_with_its_size_before_it_starts(monkeypatch):
    sizes = {"model-00001-of-00002.safetensors": 2**30, "model-00002-of-00002.safetensors": 2**29,
             "consolidated.safetensors": 2**31, "README.md": 10}  # consolidated.* is not what from_pretrained fetches
    events = _hub(monkeypatch, offline=False, cache={}, sizes=sizes)
    with pytest.raises(DesktuneError, match="stop here"):
        load_model(ModelConfig(name="some-org/big"), CPU32, log=lambda text: events.append(f"log {text}"))
    assert events[0] == "model_info timeout=10.0"
    assert events[1].startswith("log downloading model 'some-org/big' from the Hugging Face hub")
    assert "https://huggingface.co/some-org/big" in events[1] and "1.5 GiB of weights" in events[1]
    assert "HF_HUB_OFFLINE=1" in events[1]
    assert events[2:] == ["from_pretrained some-org/big"]


def test_the_download_notice_goes_to_stderr_by_default(monkeypatch, capsys):
    seen: list[str] = []
    events = _hub(monkeypatch, offline=False, cache={}, sizes=None)  # model_info fails: size unknown
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(source: str, **kwargs: object) -> None:
        seen.append(capsys.readouterr().err)  # what the user saw before the download started
        real(source, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(DesktuneError):
        load_model(ModelConfig(name="some-org/big"), CPU32)
    assert "downloading model 'some-org/big'" in seen[0] and "size unknown" in seen[0]
    assert events[-1] == "from_pretrained some-org/big"


def test_a_cached_hub_model_is_not_announced_and_the_hub_is_not_asked(monkeypatch, tiny_model_dir):
    cache = {n: tiny_model_dir / n for n in ("config.json", "tokenizer_config.json", "model.safetensors")}
    events = _hub(monkeypatch, offline=False, cache=cache, sizes={"model.safetensors": 1})
    with pytest.raises(DesktuneError):
        load_model(ModelConfig(name="some-org/tiny"), CPU32, log=lambda text: events.append(f"log {text}"))
    assert events == ["from_pretrained some-org/tiny"]


def test_a_sharded_model_with_a_shard_missing_from_the_cache_is_announced(monkeypatch, tiny_model_dir, tmp_path):
    from desktune.models.loading import hub_model_cached

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    cache = {"config.json": tiny_model_dir / "config.json", "model.safetensors.index.json": index,
             "tokenizer_config.json": tiny_model_dir / "tokenizer_config.json",
             "model-00001-of-00002.safetensors": tiny_model_dir / "model.safetensors"}
    _hub(monkeypatch, offline=False, cache=cache)
    assert not hub_model_cached("some-org/sharded")
    cache["model-00002-of-00002.safetensors"] = tiny_model_dir / "model.safetensors"
    assert hub_model_cached("some-org/sharded")
    del cache["tokenizer_config.json"]  # the tokenizer is downloaded too
    assert not hub_model_cached("some-org/sharded")


def test_offline_nothing_is_announced_nor_asked_and_the_message_stays(monkeypatch):
    import huggingface_hub

    assert huggingface_hub.is_offline_mode()  # HF_HUB_OFFLINE=1 in the tests: the real from_pretrained fails
    events: list[str] = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: events.append("model_info"))
    with pytest.raises(DesktuneError, match="cannot be reached"):
        load_model(ModelConfig(name="some-org/not-a-cached-model"), CPU32,
                   log=lambda text: events.append(f"log {text}"))
    assert events == []
