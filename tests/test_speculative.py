"""Speculative decoding (gpt2_fast/speculative.py): the output is exactly the target's greedy
decoding, whatever the draft; acceptance is reported and is 1.0 when the draft is the target."""
import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.engine import Engine, get_engine
from gpt2_fast.speculative import speculative_generate, speculative_generate_ids
from gpt2_fast.tokenizer import EOT_TOKEN
from lively import lively


def make_model(device, seed, n_layer, n_embd, n_head, block_size=96, sharpen=100.0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257,
                      block_size=block_size)).eval()
    with torch.no_grad():
        lively(m, sharpen)
    return m.to(device)


@pytest.fixture(scope="module")
def target():
    return make_model("cpu", 0, n_layer=3, n_embd=64, n_head=4)


def greedy(model, prompt, n):
    steps = list(Engine(model).generate_ids([prompt], n, temperature=0, stop_at_eot=False))
    return [int(s[0]) for s in steps]


def greedy_by_full_forward(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids], device=model.transformer.wte.weight.device))
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def distilled_draft(target, noise):
    """A draft that agrees with the target often but not always: its weights plus noise."""
    draft = make_model("cpu", 1, n_layer=3, n_embd=64, n_head=4, sharpen=1.0)
    draft.load_state_dict(target.state_dict())
    torch.manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p) * p.std())
    return draft


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_equals_greedy_with_an_unrelated_draft(target, k, prompt_len):
    draft = make_model("cpu", 7, n_layer=1, n_embd=32, n_head=2)
    prompt = torch.randint(0, 50000, (prompt_len,), generator=torch.Generator().manual_seed(k)).tolist()
    stats = {}
    out = [t for chunk in speculative_generate_ids(target, draft, prompt, 17, k=k, stop_at_eot=False,
                                                   stats=stats) for t in chunk]
    assert out == greedy(target, prompt, 17) == greedy_by_full_forward(target, prompt, 17)
    assert stats["rounds"] >= 1 and stats["drafted"] >= stats["accepted"] >= 0
    assert 0.0 <= stats["acceptance_rate"] <= 1.0


def test_draft_equal_to_target_accepts_everything(target):
    prompt = list(range(100, 109))
    res = speculative_generate(target, target, prompt, max_new_tokens=21, k=4, stop_at_eot=False)
    assert res.tokens[0] == greedy(target, prompt, 21)
    assert res.stats["acceptance_rate"] == 1.0
    assert res.stats["rounds"] == 4  # 1 token from prefill, then 5 per round (4 drafts + 1)
    verifiers = [v for key, v in get_engine(target).extra_graphs.items() if key[0] == "verify"]
    assert verifiers and verifiers[0].k == 4  # the fixed-shape verify step ran (a graph on CUDA)


def test_partial_agreement_equals_greedy(target):
    draft = distilled_draft(target, noise=0.05)
    prompt = list(range(300, 305))
    res = speculative_generate(target, draft, prompt, max_new_tokens=30, k=4, stop_at_eot=False)
    assert res.tokens[0] == greedy(target, prompt, 30)
    assert 0.0 < res.stats["acceptance_rate"] < 1.0, res.stats


def test_stops_at_eot(target):
    model = make_model("cpu", 0, n_layer=2, n_embd=64, n_head=4)
    ln_f = model.transformer.ln_f
    with torch.no_grad():  # final hidden state = wte[<|endoftext|>]: its logit is the largest
        ln_f.weight.zero_()
        ln_f.bias.copy_(model.transformer.wte.weight[EOT_TOKEN])
    res = speculative_generate(model, target, [1, 2, 3], max_new_tokens=10, k=3)
    assert res.tokens == [[]]


def test_bad_inputs(target):
    draft = make_model("cpu", 3, n_layer=1, n_embd=32, n_head=2, block_size=32)
    with pytest.raises(ValueError, match="draft model's block_size 32"):
        speculative_generate(target, draft, [1] * 20, max_new_tokens=20)
    with pytest.raises(ValueError, match="k .* in \\[1, 32\\]"):
        speculative_generate(target, draft, [1], max_new_tokens=2, k=0)
    small_vocab = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=100))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, small_vocab, [1], max_new_tokens=2)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, draft, [[1], [2]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        speculative_generate(target, draft, [50257], max_new_tokens=2)
    with pytest.raises(TypeError, match="gpt2_fast GPT"):
        speculative_generate(target, torch.nn.Linear(1, 1), [1], max_new_tokens=2)
    assert speculative_generate(target, draft, [1], max_new_tokens=0).tokens == [[]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_equals_greedy_on_cuda(target):
    t = make_model("cuda", 0, n_layer=3, n_embd=64, n_head=4)
    d = make_model("cuda", 7, n_layer=1, n_embd=32, n_head=2)
    prompt = list(range(50, 60))
    res = speculative_generate(t, d, prompt, max_new_tokens=24, k=4, stop_at_eot=False)
    assert res.tokens[0] == greedy(t, prompt, 24)


@pytest.mark.slow
def test_fused_draft_step_equals_greedy(monkeypatch):
    """The draft's decode steps run the fused step (GPT2_FAST_DECODE_STEP=fused): same output."""
    monkeypatch.setenv("GPT2_FAST_DECODE_STEP", "fused")
    t = make_model("cpu", 0, n_layer=2, n_embd=32, n_head=2, block_size=48)
    d = make_model("cpu", 7, n_layer=1, n_embd=32, n_head=2, block_size=48)
    prompt = list(range(50, 55))
    res = speculative_generate(t, d, prompt, max_new_tokens=7, k=3, stop_at_eot=False)
    assert get_engine(d).step_kind == "fused"
    monkeypatch.setenv("GPT2_FAST_DECODE_STEP", "unfused")
    assert res.tokens[0] == greedy_by_full_forward(t, prompt, 7)
