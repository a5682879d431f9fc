from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from desktune.adapters import (
    base_fingerprint,
    load_adapter,
    read_adapter_config,
    shape_mismatches,
    write_base_fingerprint,
)
from desktune.config import ModelConfig, load_config
from desktune.errors import DesktuneError
from desktune.export.merge import choose_into, merge_adapter, merged_model, parse_weights, read_adapters
from desktune.hardware import Hardware
from desktune.models.loading import load_model
from desktune.models.quantize import dequantized_weight, is_quantized_linear, quantized_linear_names
from desktune.training.loop import train
from tests.tiny import lora_adapter, make_model_dir, tiny_config

IDS = torch.tensor([[3, 17, 42, 99, 5, 8, 120, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The final adapters of two short runs on tiny_model_dir (all linear layers): a LoRA and a QLoRA (NF4)."""
    found = {}
    for quant in ("none", "nf4"):
        tmp = tmp_path_factory.mktemp(f"run-{quant}")
        raw = tiny_config(tiny_model_dir, tmp, model={"quant": quant}, lora={"target_modules": "all-linear"},
                          train={"max_steps": 4}, data={"val_fraction": 0.0})
        found[quant] = train(load_config(raw), quiet=True).adapter_dir
    return found


def _nf4_base_with(model_dir: Path, adapter: Path) -> PeftModel:
    """What QLoRA training saw: the base loaded in 4-bit NF4 as training loads it (fp32 compute), + the adapter."""
    loaded = load_model(ModelConfig(name=str(model_dir), quant="nf4"),
                        Hardware(device=torch.device("cpu"), dtype=torch.float32))
    assert quantized_linear_names(loaded.model)  # really the 4-bit base
    return PeftModel.from_pretrained(loaded.model, str(adapter))


def _merged(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # plain transformers, no peft


def test_merged_logits_match_base_plus_adapter(tiny_model_dir, tmp_path, runs):
    out = merge_adapter(runs["none"], tmp_path / "merged", dtype="fp32")
    merged = _merged(out)
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(runs["none"]))
    torch.testing.assert_close(_logits(merged), _logits(ref), rtol=1e-4, atol=1e-4)
    with ref.disable_adapter():
        assert (_logits(merged) - _logits(ref)).abs().max() > 1e-4  # the merge changed the weights
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None


def test_qlora_merges_into_the_dequantized_weights_training_saw(tiny_model_dir, tmp_path, runs):
    notes: list[str] = []
    out = merge_adapter(runs["nf4"], tmp_path / "merged", dtype="fp32", log=notes.append)  # the default: dequantized
    assert any("de-quantized nf4" in n for n in notes)
    merged = _merged(out)
    assert not any("lora" in k for k in merged.state_dict())
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    trained = _logits(_nf4_base_with(tiny_model_dir, runs["nf4"]))
    torch.testing.assert_close(_logits(merged), trained, rtol=0, atol=1e-5)  # measured: max 2.0e-6
    original = _merged(merge_adapter(runs["nf4"], tmp_path / "original", dtype="fp32", into="original"))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    str(runs["nf4"]))
    torch.testing.assert_close(_logits(original), _logits(ref), rtol=1e-4, atol=1e-4)  # today's 16-bit merge
    assert (_logits(original) - trained).abs().max() > 0.05  # the NF4 rounding training saw: measured 0.68


def test_qlora_merge_in_bf16_rounds_the_dequantized_weights_once(tiny_model_dir, tmp_path, runs):
    merged = _merged(merge_adapter(runs["nf4"], tmp_path / "m16"))  # the default dtype: bf16
    nf4 = load_model(ModelConfig(name=str(tiny_model_dir), quant="nf4"),
                     Hardware(device=torch.device("cpu"), dtype=torch.float32)).model
    layers = dict(nf4.named_modules())
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    quantized = 0
    for key, got in merged.state_dict().items():  # each weight: W_nf4 + delta, rounded to bf16 once
        module = key.removesuffix(".weight")
        if module in layers and is_quantized_linear(layers[module]):
            w, quantized = dequantized_weight(layers[module]), quantized + 1
        else:
            w = plain[key]
        assert torch.equal(got, (w.float() + _delta(runs["nf4"], module)).to(torch.bfloat16).float()), key
    assert quantized == 2 * 7


def test_into_dequantized_is_refused_for_an_adapter_of_a_16_bit_base(runs, tmp_path):
    with pytest.raises(DesktuneError, match="--into dequantized is for adapters trained on one 4-bit or 8-bit base; "
                                            "this one trained on a 16-bit base") as e:
        merge_adapter(runs["none"], tmp_path / "m", into="dequantized")
    assert e.value.where == str(runs["none"]) and "leave out --into" in e.value.fix
    with pytest.raises(DesktuneError, match="unknown --into 'nf4'"):
        merge_adapter(runs["nf4"], tmp_path / "m", into="nf4")


def test_qlora_is_known_from_the_run_config_without_desktune_json(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    adapter = Path(shutil.copytree(runs["nf4"], run / "adapter"))
    (adapter / "desktune.json").unlink()
    assert read_adapters([adapter])[0].quant == "unknown"  # nothing left to tell
    shutil.copy(runs["nf4"].parent / "config.yaml", run / "config.yaml")
    (found,) = read_adapters([adapter])
    assert (found.quant, found.train_dtype) == ("nf4", "fp32")
    assert choose_into([found], None) == "dequantized"


def test_adapters_of_differently_quantized_bases_need_an_explicit_into(runs):
    adapters = read_adapters([runs["nf4"], runs["none"]])
    with pytest.raises(DesktuneError, match="trained on differently quantized bases") as e:
        choose_into(adapters, None)
    assert "--into original" in e.value.fix
    assert choose_into(adapters, "original") == "original"
    with pytest.raises(DesktuneError, match="this one trained on a 16-bit base"):
        choose_into(adapters, "dequantized")


# ---------------------------------------------------------------- several adapters, weighted


def _delta(adapter: Path, module: str) -> torch.Tensor:
    """scale * B @ A of one layer, straight from the adapter's files (zero when it does not adapt the layer)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    a = tensors.get(f"base_model.model.{module}.lora_A.weight")
    if a is None:
        return torch.zeros(())
    return tensors[f"base_model.model.{module}.lora_B.weight"] @ a * (cfg["lora_alpha"] / cfg["r"])


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two random peft LoRA adapters of tiny_model_dir of different ranks and targets."""
    tmp = tmp_path_factory.mktemp("two")
    torch.manual_seed(1)
    a = lora_adapter(tiny_model_dir, tmp / "a")
    torch.manual_seed(2)
    b = lora_adapter(tiny_model_dir, tmp / "b", r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"])
    return a, b


def test_weighted_merge_adds_each_adapters_delta_times_its_weight(tiny_model_dir, tmp_path, two_adapters):
    a, b = two_adapters
    out = merge_adapter([a, b], tmp_path / "merged", dtype="fp32", weights=[0.7, -0.3])
    merged = _merged(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    changed = 0
    for key, w in base.items():
        module = key.removesuffix(".weight")
        want = w + 0.7 * _delta(a, module) - 0.3 * _delta(b, module)
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6)
        changed += not torch.equal(want, w)
    assert changed == 2 * 7  # every linear layer of both decoder layers
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template


def test_one_adapter_with_a_weight_scales_its_delta(tiny_model_dir, two_adapters):
    a, _ = two_adapters
    half, _ = merged_model(a, dtype="fp32", weights=[0.5])
    full, _ = merged_model(a, dtype="fp32")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(half.state_dict()[key] - base[key], 0.5 * (full.state_dict()[key] - base[key]),
                               rtol=0, atol=1e-6)


def test_weights_must_be_one_number_per_adapter(two_adapters, tmp_path):
    with pytest.raises(DesktuneError, match=r"1 weight\(s\) for 2 adapter\(s\)") as e:
        merge_adapter(list(two_adapters), tmp_path / "m", weights=[0.5])
    assert e.value.where == "--weights"
    with pytest.raises(DesktuneError, match=r"not a comma-separated list of numbers: '0\.5;0\.5'"):
        parse_weights("0.5;0.5")
    assert parse_weights("0.7,0.3") == [0.7, 0.3] and parse_weights(None) is None
    with pytest.raises(DesktuneError, match="not a finite number"):
        read_adapters(list(two_adapters), [1.0, float("nan")])


def test_dora_merges_alone_but_not_weighted(peft_adapter, two_adapters, tmp_path):
    with pytest.raises(DesktuneError, match=r"a DoRA adapter .* cannot be merged weighted or with other") as e:
        merge_adapter([two_adapters[0], peft_adapter], tmp_path / "m", dtype="fp32")
    assert e.value.where == str(peft_adapter)
    with pytest.raises(DesktuneError, match="a DoRA adapter"):
        merge_adapter(peft_adapter, tmp_path / "m", dtype="fp32", weights=[0.5])


def test_adapters_with_different_chat_templates_are_refused(two_adapters, tmp_path):
    import shutil

    b = Path(shutil.copytree(two_adapters[1], tmp_path / "b"))
    (b / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    said = re.escape(f"its chat template differs from that of {two_adapters[0]}")
    with pytest.raises(DesktuneError, match=said) as e:
        merge_adapter([two_adapters[0], b], tmp_path / "m")
    assert e.value.where == str(b)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- the base: fingerprint, else name


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """A tiny Llama of exactly tiny_model_dir's shapes but other weights (another seed)."""
    return make_model_dir(tmp_path_factory.mktemp("twin-llama"), init_std=0.1, seed=1)


def _no_base_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def called(*args: object, **kwargs: object) -> None:
        pytest.fail("the base loaded: the base check should have refused first")

    monkeypatch.setattr("desktune.export.merge.load_model", called)


def test_training_records_the_base_fingerprint(runs, tiny_model_dir):
    for adapter in runs.values():
        recorded = json.loads((adapter / "base_fingerprint.json").read_text())
        assert recorded == base_fingerprint(str(tiny_model_dir))
        assert recorded["tensors"] == 20 and len(recorded["samples"]) == 20  # 20 tensors, all sampled


def test_a_base_of_the_same_shapes_but_other_weights_is_refused(runs, twin, tiny_model_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _no_base_load(m)
        with pytest.raises(DesktuneError) as e:
            merge_adapter(runs["none"], tmp_path / "m", model=str(twin))
    assert str(e.value).startswith(f"{runs['none']}: the adapter was trained on another base: {twin} does not "
                                   "match the fingerprint in base_fingerprint.json: its weights differ")
    assert e.value.fix == f"use the base model the adapter was trained on: {tiny_model_dir} (the default when " \
                          "--model is left out), or pass --force-base to merge anyway"
    notes: list[str] = []
    assert merge_adapter(runs["none"], tmp_path / "forced", model=str(twin), dtype="fp32", force_base=True,
                         log=notes.append).is_dir()
    assert notes == ["note: --force-base: the base was not checked against the adapters"]


def test_the_same_base_saved_elsewhere_in_bf16_is_accepted(runs, tiny_model_dir, tmp_path):
    copy = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(copy)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(copy)
    assert merge_adapter(runs["none"], tmp_path / "m", model=str(copy), dtype="fp32").is_dir()


def test_a_base_of_another_layout_that_fits_the_adapter_is_refused(runs, tmp_path_factory, tmp_path):
    deeper = make_model_dir(tmp_path_factory.mktemp("deeper"), layers=3, init_std=0.1)  # layers 0, 1 fit
    with pytest.raises(DesktuneError, match="does not match the fingerprint in base_fingerprint.json: its tensors "
                                            r"have other names or shapes \(29 tensors; the adapter's base had 20\)"):
        merge_adapter(runs["none"], tmp_path / "m", model=str(deeper))
    assert not (tmp_path / "m").exists()


def test_adapters_of_different_bases_are_refused_naming_the_odd_one(runs, twin, tmp_path, monkeypatch):
    import shutil

    odd = Path(shutil.copytree(runs["none"], tmp_path / "odd"))
    write_base_fingerprint(odd, str(twin))  # as if trained on the twin
    _no_base_load(monkeypatch)
    with pytest.raises(DesktuneError, match="the adapter was trained on another base") as e:
        merge_adapter([runs["none"], odd], tmp_path / "m")
    assert e.value.where == str(odd)


def test_without_a_fingerprint_another_base_name_is_refused(two_adapters, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    a = two_adapters[0]
    assert not (a / "base_fingerprint.json").exists()  # made by peft, not desktune
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "same-weights"))
    with monkeypatch.context() as m:
        _no_base_load(m)
        with pytest.raises(DesktuneError, match=re.escape(f"the adapter was trained on {tiny_model_dir}, not "
                                                          f"{copy}, and records no fingerprint")) as e:
            merge_adapter(a, tmp_path / "m", model=str(copy))
    assert e.value.fix == f"use {tiny_model_dir} (leave out --model), or pass --force-base if {copy} holds the " \
                          "same weights"
    assert merge_adapter(a, tmp_path / "m", model=str(copy), dtype="fp32", force_base=True).is_dir()


def test_cli_merges_two_adapters_weighted_and_refuses_a_foreign_base(two_adapters, twin, runs, tmp_path,
                                                                     monkeypatch, capsys):
    from tests.test_cli import run_main

    a, b = two_adapters
    code, out, err = run_main(monkeypatch, capsys, "merge", str(a), str(b), "--weights", "0.7,0.3", "--output",
                              str(tmp_path / "merged"), "--dtype", "fp32")
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()
    code, out, err = run_main(monkeypatch, capsys, "merge", str(runs["none"]), "--output", str(tmp_path / "m2"),
                              "--model", str(twin))
    assert code == 2 and "Traceback" not in out + err
    assert "the adapter was trained on another base" in err and "--force-base" in err


def test_bf16_merge_writes_16_bit_safetensors(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 1})), quiet=True)
    out = merge_adapter(result.adapter_dir, tmp_path / "m16")
    assert list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16


def test_merge_refuses_a_non_empty_output(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 1})), quiet=True)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DesktuneError, match="not empty"):
        merge_adapter(result.adapter_dir, target)
    assert (target / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- adapter errors: causes, shapes, bugs


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A DoRA adapter on q_proj / v_proj of tiny_model_dir, saved by peft (untrained: only its shapes matter)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", use_dora=True)
    out = tmp_path_factory.mktemp("peft-adapter") / "adapter"
    peft.get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory) -> torch.nn.Module:
    """A tiny Llama of another hidden size: adapters of tiny_model_dir do not fit it."""
    folder = make_model_dir(tmp_path_factory.mktemp("narrow-llama"), hidden=32)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _peft_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def called(*args: object, **kwargs: object) -> None:
        pytest.fail("peft ran: the shape check should have refused the adapter first")

    monkeypatch.setattr(PeftModel, "from_pretrained", called)


def test_invalid_adapter_config_keeps_the_decoder_error_as_cause(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(DesktuneError, match="invalid JSON") as e:
        read_adapter_config(tmp_path)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


def test_adapter_of_another_base_is_refused_by_its_shapes(peft_adapter, narrow_base, tiny_model_dir, monkeypatch):
    _peft_must_not_run(monkeypatch)
    with pytest.raises(DesktuneError) as e:
        load_adapter(narrow_base, peft_adapter)
    assert str(e.value).startswith(f"{peft_adapter}: could not load the adapter: its weight shapes do not match "
                                   "this base model (was it trained on another base?)")
    assert e.value.fix == f"use the base model the adapter was trained on: {tiny_model_dir} (the default when " \
                          "--model is left out)"


def test_shape_check_passes_the_right_base_and_names_each_misfit(peft_adapter, narrow_base, tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(peft_adapter / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert any(k.endswith("lora_magnitude_vector") for k in shapes)  # DoRA's tensors are checked too
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shape_mismatches(base, shapes) == []
    misfits = shape_mismatches(narrow_base, shapes)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight: (4, 64), the base needs (4, 32)" in misfits


def test_a_bug_inside_peft_is_not_a_user_error(peft_adapter, tiny_model_dir, monkeypatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in peft")

    monkeypatch.setattr(PeftModel, "from_pretrained", broken)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(TypeError, match="a bug in peft"):
        load_adapter(base, peft_adapter)


def test_a_peft_refusal_keeps_its_cause(peft_adapter, tiny_model_dir, tmp_path):
    import shutil

    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["nope_proj"]}))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(DesktuneError, match="could not load the adapter: Target modules") as e:
        load_adapter(base, adapter)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_failed_write_leaves_nothing_behind(peft_adapter, tmp_path, monkeypatch):
    def disk_full(self: object, folder: str | Path, *args: object, **kwargs: object) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    with pytest.raises(DesktuneError, match=r"cannot write the merged model \(No space left on device\)") as e:
        merge_adapter(peft_adapter, out_dir / "merged", dtype="fp32")
    assert isinstance(e.value.__cause__, OSError)
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary sibling


def test_merge_fills_an_existing_empty_folder(peft_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    assert merge_adapter(peft_adapter, out, dtype="fp32") == out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
