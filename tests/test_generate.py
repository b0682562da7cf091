import pytest
import torch

from gpt2_fast import GPT, GPTConfig, generate, get_tokenizer, sample_logits, stream
from gpt2_fast.generate import encode_prompts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, block_size=64)).eval()
    with torch.no_grad():  # sharpen the logits so greedy choices are far from ties
        m.transformer.wte.weight.mul_(20)
    return m


def greedy_by_full_forward(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_cached_greedy_equals_full_forward(model):
    prompt = get_tokenizer().encode("The quick brown fox")
    out = generate(model, [prompt], max_new_tokens=12, temperature=0, stop_at_eot=False)
    assert out.tokens[0] == greedy_by_full_forward(model, prompt, 12)
    assert out.ms_per_token > 0 and out.tokens_per_s > 0 and out.time_to_first_token_s > 0


def test_ragged_batch_equals_each_alone(model):
    tok = get_tokenizer()
    prompts = ["Hi", "In the beginning God created the heaven", "And the earth was"]
    out = generate(model, prompts, max_new_tokens=8, temperature=0, stop_at_eot=False)
    for p, new in zip(prompts, out.tokens):
        assert new == greedy_by_full_forward(model, tok.encode(p), 8)
    assert out.texts == [tok.decode(t) for t in out.tokens]


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=10, temperature=5.0, top_k=5000, top_p=0.99, stop_at_eot=False)
    a = generate(model, "Once upon a time", seed=123, **kw).tokens
    b = generate(model, "Once upon a time", seed=123, **kw).tokens
    c = generate(model, "Once upon a time", seed=124, **kw).tokens
    assert a == b and a != c


def test_stream_pieces_concatenate_to_generate(model):
    text = "".join(stream(model, "Hello", max_new_tokens=10, temperature=0, stop_at_eot=False))
    assert text == generate(model, "Hello", max_new_tokens=10, temperature=0, stop_at_eot=False).texts[0]


def test_stops_at_eot(model):
    ln_f = model.transformer.ln_f
    saved = ln_f.weight.clone(), ln_f.bias.clone()
    with torch.no_grad():  # final hidden state = wte[<|endoftext|>]: its logit is the largest
        ln_f.weight.zero_()
        ln_f.bias.copy_(model.transformer.wte.weight[50256])
        out = generate(model, "x", max_new_tokens=10, temperature=0)
        ln_f.weight.copy_(saved[0])
        ln_f.bias.copy_(saved[1])
    assert out.tokens == [[]] and out.texts == [""]


def test_top_k_top_p_on_constructed_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    counts = torch.bincount(sample_logits(logits, 1.0, top_k=2, generator=g), minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] - 0.625) < 0.03
    counts = torch.bincount(sample_logits(logits, 1.0, top_p=0.7, generator=g), minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] - 0.625) < 0.03  # {0.5, 0.3} reaches 0.7
    counts = torch.bincount(sample_logits(logits, 1.0, top_p=0.81, generator=g), minlength=4).float() / 4000
    assert counts[2] > 0 and counts[3] == 0
    counts = torch.bincount(sample_logits(logits, 1.0, generator=g), minlength=4).float() / 4000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert (sample_logits(logits, 0.0) == 0).all()
    assert (sample_logits(logits, 1.0, top_p=0.1, generator=g) == 0).all()  # the top token always stays


def test_bad_generation_inputs(model):
    with pytest.raises(ValueError, match="block_size 64"):
        generate(model, [1] * 60, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        generate(model, [1, 2, 50257], max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, "a", max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, "a", max_new_tokens=2, top_p=0)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, [3.5], max_new_tokens=2)


def test_empty_prompt_starts_from_eot():
    assert encode_prompts("", None, 50257) == [[50256]]
    assert encode_prompts([[1, 2], "Hello world"], None, 50257) == [[1, 2], [15496, 995]]
