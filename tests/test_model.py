import math

import pytest
import torch

from gpt2_fast import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_hf_parameter_names_and_tying():
    names = dict(tiny().named_parameters())
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
              "transformer.h.1.mlp.c_proj.bias", "transformer.h.1.ln_2.bias", "transformer.ln_f.weight"]:
        assert n in names
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight


def test_init_scales():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, block_size=64))
    resid = 0.02 / math.sqrt(2 * 8)
    assert abs(m.transformer.h[3].attn.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert abs(m.transformer.h[3].mlp.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert abs(m.transformer.h[3].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 0.002
    assert m.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    assert torch.equal(m.transformer.h[0].ln_1.weight, torch.ones(256))


def test_forward_shapes_and_ignore_index():
    m = tiny()
    idx = torch.randint(0, 101, (3, 17))
    logits, loss = m(idx)
    assert logits.shape == (3, 17, 101) and loss is None
    targets = torch.randint(0, 101, (3, 17))
    targets[:, :5] = -100
    logits, loss = m(idx, targets)
    expect = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 101), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expect)
    none, fused = m(idx, targets, return_logits=False)
    assert none is None
    torch.testing.assert_close(fused, expect)
    last, _ = m(idx, only_last=True)
    torch.testing.assert_close(last, logits[:, -1:])


def test_kv_cache_matches_full_forward():
    m = tiny().eval()
    idx = torch.randint(0, 101, (2, 20))
    full, _ = m(idx)
    m.setup_cache(max_batch_size=4, max_seq_len=24)
    with torch.no_grad():
        pre, _ = m(idx[:, :12], input_pos=torch.arange(12))
        steps = [m(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(12, 20)]
    torch.testing.assert_close(pre, full[:, :12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 12:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a few tokens at once (speculative verification) against the cache
        chunk, _ = m(idx[:, 12:15], input_pos=torch.arange(12, 15))
    torch.testing.assert_close(chunk, full[:, 12:15], atol=1e-5, rtol=1e-5)


def test_left_padding_equals_unpadded():
    m = tiny().eval()
    a = torch.randint(0, 101, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1)
    alone, _ = m(a)
    m.setup_cache(1, 16)
    with torch.no_grad():
        got, _ = m(padded, input_pos=torch.arange(13), kv_start=torch.tensor([4], dtype=torch.int32))
    torch.testing.assert_close(got[:, 4:], alone, atol=1e-5, rtol=1e-5)


def test_training_loss_falls():
    m = tiny(n_layer=1, vocab_size=16, block_size=16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.arange(16).repeat(4, 1) % 16
    y = (x + 1) % 16
    first = None
    for _ in range(60):
        _, loss = m(x, y, return_logits=False)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first


def test_dropout_only_in_training():
    m = tiny(dropout=0.5)
    idx = torch.randint(0, 101, (2, 8))
    m.eval()
    torch.testing.assert_close(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])


def test_set_backend_and_env_override(monkeypatch):
    from gpt2_fast import ops
    m = tiny().set_backend("torch")
    assert all(b.attn.backend == "torch" for b in m.transformer.h)
    with pytest.raises(ValueError, match="backend"):
        m.set_backend("nope")
    monkeypatch.setenv("GPT2_FAST_BACKEND", "torch")
    assert ops.requested_backend("triton") == "torch"
    monkeypatch.setenv("GPT2_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GPT2_FAST_BACKEND"):
        ops.requested_backend("auto")


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(2, 5), "int64"),
    (lambda: torch.zeros(5, dtype=torch.long), r"\(B, T\)"),
    (lambda: torch.zeros(1, 33, dtype=torch.long), "exceeds block_size 32"),
    (lambda: torch.full((1, 4), 101), r"\[0, 101\)"),
    (lambda: torch.full((1, 4), -1), r"\[0, 101\)"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny()(bad())


def test_cache_errors():
    m = tiny()
    with pytest.raises(RuntimeError, match="setup_cache"):
        m(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    m.setup_cache(2, 8)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([8]))
    with pytest.raises(ValueError, match="max_batch_size 2"):
        m(torch.zeros(3, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="max_seq_len"):
        m.setup_cache(1, 33)
    with pytest.raises(ValueError, match="targets"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
