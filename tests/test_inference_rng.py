"""Generation seeds its own sampling and leaves the process-global RNG exactly as it found it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from desktune.inference import conversation, private_rng, reply

SAMPLED = {"temperature": 1.5, "top_p": 1.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _answer(model_and_tokenizer, seed: int, **kwargs) -> str:
    model, tok = model_and_tokenizer
    return reply(model, tok, conversation("what is the sea?"), seed=seed, **(SAMPLED | kwargs))


@pytest.mark.parametrize("temperature", [1.5, 0.0])
def test_reply_leaves_the_global_rng_state_unchanged(model_and_tokenizer, temperature):
    torch.manual_seed(1234)
    torch.rand(7)  # somewhere mid-stream, as in a training run
    before = torch.get_rng_state()
    _answer(model_and_tokenizer, seed=0, temperature=temperature)
    assert torch.equal(torch.get_rng_state(), before)


def test_global_random_stream_continues_as_if_no_reply_ran(model_and_tokenizer):
    torch.manual_seed(99)
    expected = torch.rand(16)
    torch.manual_seed(99)
    _answer(model_and_tokenizer, seed=3)
    torch.testing.assert_close(torch.rand(16), expected, rtol=0, atol=0)


def test_same_seed_gives_the_same_sampled_answer_whatever_the_global_state(model_and_tokenizer):
    torch.manual_seed(1)
    first = _answer(model_and_tokenizer, seed=7)
    torch.manual_seed(2)
    torch.rand(100)
    assert _answer(model_and_tokenizer, seed=7) == first
    assert first  # something was sampled
    answers = {_answer(model_and_tokenizer, seed=s) for s in range(4)}
    assert len(answers) > 1  # the seed really drives the sampling


def test_private_rng_restores_the_state_on_errors():
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError), private_rng(5, torch.device("cpu")):
        assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(5).get_state())
        torch.rand(10)
        raise RuntimeError("generation failed")
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_private_rng_forks_and_seeds_the_cuda_generator_too():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.manual_seed(11)
    torch.rand(5, device=device)
    before = torch.cuda.get_rng_state(device)
    with private_rng(3, device):
        inside = torch.rand(8, device=device)
    with private_rng(3, device):
        torch.testing.assert_close(torch.rand(8, device=device), inside, rtol=0, atol=0)
    assert torch.equal(torch.cuda.get_rng_state(device), before)
