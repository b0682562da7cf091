"""The decode engine (gpt2_fast/engine.py): greedy output == full re-forward, ragged batches ==
each row alone, batch buckets, device sampling, cache overflow, and (on CUDA) graph == eager."""
import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.engine import (BUCKETS, Engine, SamplingMode, batch_bucket, exponential_noise,
                              get_engine, sample_on_device)
from gpt2_fast.tokenizer import EOT_TOKEN
from lively import lively


def make_model(device, seed=0, n_layer=2, n_embd=64, n_head=4, block_size=64):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257,
                      block_size=block_size)).eval()
    with torch.no_grad():
        lively(m, 100.0)
    return m.to(device)


@pytest.fixture(scope="module")
def cpu_model():
    return make_model("cpu")


def greedy_by_full_forward(model, ids, n):
    """The reference: re-run the whole sequence for every new token, no cache."""
    ids = list(ids)
    dev = model.transformer.wte.weight.device
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids], device=dev))
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def run(engine, prompts, n, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("stop_at_eot", False)
    steps = list(engine.generate_ids(prompts, n, **kw))
    return torch.stack(steps, 1).tolist()


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]


def test_batch_bucket():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 17, 64, 65, 130)] == [1, 2, 4, 4, 8, 32, 64, 128, 192]
    assert BUCKETS[0] == 1 and BUCKETS[-1] == 64
    with pytest.raises(ValueError, match="positive"):
        batch_bucket(0)


@pytest.mark.parametrize("length", [1, 7])
def test_batch1_greedy_equals_full_forward(device, length):
    model = make_model(device)
    prompt = random_prompts([length], seed=length)
    got = run(Engine(model), prompt, 12)
    assert got[0] == greedy_by_full_forward(model, prompt[0], 12)


def test_ragged_batch_equals_each_row_alone(device):
    model = make_model(device)
    prompts = random_prompts([3, 11, 1], seed=1)  # batch 3 runs in bucket 4: one spare row
    engine = Engine(model)
    got = run(engine, prompts, 9)
    for p, row in zip(prompts, got):
        assert row == greedy_by_full_forward(model, p, 9)
    # the same engine, reused with another batch size and longer prompts
    prompts = random_prompts([5, 2, 9, 9, 4], seed=2)  # bucket 8
    got = run(engine, prompts, 6)
    for p, row in zip(prompts, got):
        assert row == greedy_by_full_forward(model, p, 6)


def test_cpu_layout_same_tokens_and_shapes():
    a, b = make_model("cpu"), make_model("cpu")
    prompts = random_prompts([4, 9], seed=11)
    got_b = run(Engine(b), prompts, 7)  # the default leaves the user's parameters alone
    assert all(p.is_contiguous() for p in b.parameters())
    got_a = run(Engine(a, cpu_layout=True), prompts, 7)
    assert got_a == got_b
    w = a.transformer.h[0].mlp.c_fc.weight
    assert w.shape == (256, 64) and w.stride() == (1, 256)     # (in, out)-major storage
    assert a.lm_head.weight is a.transformer.wte.weight        # still tied
    assert a.transformer.wpe.weight.is_contiguous()
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_b)
    logits_a, _ = a(torch.tensor(prompts[1:]))                   # plain forward still works
    logits_b, _ = b(torch.tensor(prompts[1:]))
    torch.testing.assert_close(logits_a, logits_b, atol=1e-4, rtol=1e-4)


def test_unpadded_prefill_uses_attention_and_matches_padded(cpu_model):
    """The fresh prefill (causal flash attention) and the padded one (decode attention with
    kv_start) give the same logits for the same real tokens."""
    engine = Engine(cpu_model)
    engine._prepare(2, 20)
    prompt = random_prompts([6], seed=3)[0]
    with torch.inference_mode():
        a, _, kv_start, _ = engine.prefill([prompt])
        assert kv_start is None
        b, _, kv_start, _ = engine.prefill([prompt, prompt + [1, 2, 3]])
        assert kv_start.tolist() == [3, 0]
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)


def test_step_advances_position_on_device(cpu_model):
    """The step reads and writes only its static buffers and moves pos itself."""
    engine = Engine(cpu_model, max_seq_len=16)  # room for the extra step below, whatever ran before
    prompts = random_prompts([4, 4], seed=4)
    list(engine.generate_ids(prompts, 3, temperature=0, stop_at_eot=False))
    buf = engine._buffers[2]
    assert int(buf.pos) == 4 + 2
    ref = [greedy_by_full_forward(cpu_model, p, 3) for p in prompts]
    assert buf.seq[:, 4:7].tolist() == ref
    mode = SamplingMode.make(0, None, None, 50257)
    with torch.inference_mode():
        engine.run_step(buf, mode, live=7)
    assert int(buf.pos) == 7
    assert buf.seq[:, 7].tolist() == [greedy_by_full_forward(cpu_model, p, 4)[-1] for p in prompts]


def test_cache_overflow_is_a_clear_error(cpu_model):
    engine = Engine(cpu_model, max_seq_len=16)
    with pytest.raises(ValueError, match="KV cache overflow.*max_seq_len=16"):
        run(engine, random_prompts([10], 5), 8)          # needs 17 slots
    got = run(engine, random_prompts([10], 5), 7)        # needs exactly 16: fine
    assert got[0] == greedy_by_full_forward(cpu_model, random_prompts([10], 5)[0], 7)
    with pytest.raises(ValueError, match="block_size 64"):
        run(Engine(cpu_model), random_prompts([60], 6), 5)
    with pytest.raises(ValueError, match="max_seq_len must be"):
        Engine(cpu_model, max_seq_len=65)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        Engine(cpu_model, cuda_graph=True)
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        run(engine, [[1, 50257]], 2)
    with pytest.raises(TypeError, match="GPT model"):
        Engine(torch.nn.Linear(2, 2))


def test_seeded_sampling(cpu_model):
    engine = get_engine(cpu_model)
    prompts = random_prompts([5, 3], seed=7)
    kw = dict(temperature=3.0, top_k=2000, top_p=0.95)
    a, b = run(engine, prompts, 10, seed=1, **kw), run(engine, prompts, 10, seed=1, **kw)
    c = run(engine, prompts, 10, seed=2, **kw)
    assert a == b and a != c
    assert get_engine(cpu_model) is engine


def test_stop_at_eot_ends_generation():
    model = make_model("cpu")
    ln_f = model.transformer.ln_f
    with torch.no_grad():  # final hidden state = wte[<|endoftext|>]: its logit is the largest
        ln_f.weight.zero_()
        ln_f.bias.copy_(model.transformer.wte.weight[EOT_TOKEN])
    steps = list(Engine(model).generate_ids([[1, 2], [3]], 10, temperature=0))
    assert len(steps) == 1 and steps[0].tolist() == [EOT_TOKEN, EOT_TOKEN]


def test_device_sampler_rules():
    """sample_on_device follows sample_logits' rules: top-k, top-p (top token always stays),
    and draws from the (renormalised) distribution."""
    n = 4000
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(n, 1)
    seed, counter = torch.tensor([1234]), torch.tensor([5])
    t1, p1 = torch.ones(1), torch.ones(1)

    def freq(mode, top_p=p1, temperature=t1):
        ids = sample_on_device(logits, mode, temperature, top_p, seed, counter)
        return torch.bincount(ids, minlength=4).float() / n

    c = freq(SamplingMode.make(1.0, None, None, 4))
    torch.testing.assert_close(c, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    c = freq(SamplingMode.make(1.0, 2, None, 4))
    assert c[2] == 0 and c[3] == 0 and abs(c[0] - 0.625) < 0.03
    c = freq(SamplingMode.make(1.0, None, 0.7, 4), top_p=torch.tensor([0.7]))
    assert c[2] == 0 and c[3] == 0 and abs(c[0] - 0.625) < 0.03
    c = freq(SamplingMode.make(1.0, None, 0.81, 4), top_p=torch.tensor([0.81]))
    assert c[2] > 0 and c[3] == 0
    c = freq(SamplingMode.make(1.0, None, 0.1, 4), top_p=torch.tensor([0.1]))
    assert c[0] == 1
    c = freq(SamplingMode.make(1e6, None, None, 4), temperature=torch.tensor([1e6]))  # ~uniform
    assert (c - 0.25).abs().max() < 0.03
    assert SamplingMode.make(0, 50, 0.9, 4).greedy and SamplingMode.make(1.0, 1, None, 4).greedy
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        kw = dict(temperature=1.0, top_k=None, top_p=None, vocab_size=4) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingMode.make(**kw)


def test_exponential_noise_is_exp1_and_depends_on_every_input():
    s, c = torch.tensor([7]), torch.tensor([3])
    e = exponential_noise(s, c, 4, 50257)
    assert e.shape == (4, 50257) and torch.isfinite(e).all() and (e > 0).all()
    assert abs(e.mean().item() - 1.0) < 0.02 and abs(e.std().item() - 1.0) < 0.03
    u = torch.exp(-e).flatten()  # uniform on (0, 1): every decile holds about 10%
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01
    assert torch.equal(e, exponential_noise(s, c, 4, 50257))
    assert not torch.equal(e, exponential_noise(s + 1, c, 4, 50257))
    assert not torch.equal(e, exponential_noise(s, c + 1, 4, 50257))
    assert not torch.equal(e[0], e[1])
    x = torch.stack([e[0, :-1], e[0, 1:]])  # neighbouring columns are uncorrelated
    assert abs(torch.corrcoef(x)[0, 1].item()) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("step", ["unfused", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype, step):
    model = make_model("cuda").to(dtype)
    prompts = random_prompts([3, 11, 1], seed=8)
    graph = Engine(model, cuda_graph=True, decode_step=step)
    eager = Engine(model, cuda_graph=False, decode_step=step)
    for kw in (dict(temperature=0), dict(temperature=0.8, top_k=100, top_p=0.9, seed=3)):
        a = run(graph, prompts, 12, **kw)
        b = run(eager, prompts, 12, **kw)
        assert a == b, kw
        assert run(graph, prompts, 12, **kw) == a  # replaying the captured graphs again
    assert graph._buffers[4].graphs, "no graph was captured"
    if dtype == torch.float32:
        for p, row in zip(prompts, run(graph, prompts, 12, temperature=0)):
            assert row == greedy_by_full_forward(model, p, 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile reduce-overhead needs a GPU")
@pytest.mark.parametrize("step", ["unfused", "fused"])
def test_compile_runner_equals_graph(monkeypatch, step):
    """decode_runner "compile" (GPT2_FAST_DECODE_RUNNER): the same tokens as the CUDA graph."""
    model = make_model("cuda").to(torch.bfloat16)
    prompts = random_prompts([3, 11, 1], seed=8)
    kw = dict(temperature=0.8, top_k=100, top_p=0.9, seed=3)
    want = run(Engine(model, decode_step=step), prompts, 10, **kw)
    monkeypatch.setenv("GPT2_FAST_DECODE_RUNNER", "compile")
    engine = Engine(model, decode_step=step)
    assert engine.decode_runner == "compile"
    assert run(engine, prompts, 10, **kw) == want


def test_compile_runner_needs_cuda(monkeypatch, cpu_model):
    from gpt2_fast.decode_fused import compiled_runner
    with pytest.raises(NotImplementedError, match="GPT2_FAST_DECODE_RUNNER=compile needs CUDA"):
        compiled_runner(lambda: None, torch.device("cpu"))


@pytest.mark.parametrize("step", [pytest.param("unfused", marks=pytest.mark.slow), "fused"])
def test_step_reads_nothing_on_the_host(step):
    """Graph safety on any device: the decode step dispatches no item()/bool() of a tensor."""
    from gpt2_fast.benchmarks.op_count import count_step
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, block_size=16)).eval()
    for sampling in ("greedy", "sample"):
        assert count_step(model, step, sampling, batch=2).host_reads == {}, (step, sampling)


def test_small_vocabulary_without_eot_fills_spare_rows_safely(monkeypatch):
    """A vocabulary below the EOT id: the bucket's spare rows must not feed EOT to the embedding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=64)).eval()
    outs = []
    for fused in ("0", "1"):  # the module-by-module step and the C++ CPU step
        monkeypatch.setenv("GPT2_FAST_CPU_FUSED", fused)
        eng = Engine(model)
        outs.append([t.tolist() for t in eng.generate_ids([[1, 2, 3], [4, 5, 6], [7, 8, 9]],
                                                          max_new_tokens=4, temperature=0.0)])
    assert outs[0] == outs[1]
    assert all(0 <= t < 97 for step in outs[0] for t in step)
