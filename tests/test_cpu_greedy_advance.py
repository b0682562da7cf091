"""cpu_greedy_advance (csrc/cpu/greedy_advance.cpp), the end of a greedy CPU engine step in one call,
against the ATen ops it replaces in gpt2_fast/engine.py's _step: torch.argmax's values (ties: the first
index; NaN: the first NaN; all -inf), finished rows get the filler, done |= (nxt == eot) & stop, pos
advances; the engine's greedy tokens with it == with the ATen ops; bad inputs give clear errors."""
import pytest
import torch

ext = pytest.importorskip("gpt2_fast.extension")
if ext.unavailable_reason("cpu") or not hasattr(torch.ops.gpt2_fast, "cpu_greedy_advance"):
    pytest.skip("the compiled extension with cpu_greedy_advance is not built", allow_module_level=True)

advance = torch.ops.gpt2_fast.cpu_greedy_advance
EOT, FILLER = 7, 5


def reference(logits, seq, pos, done, stop):
    """engine._step's ATen ops after the forward, on copies."""
    seq, pos, done = seq.clone(), pos.clone(), done.clone()
    nxt = logits.argmax(dim=-1)
    nxt = torch.where(done, torch.full_like(nxt, FILLER), nxt)
    seq.index_copy_(1, pos + 1, nxt[:, None])
    done |= (nxt == EOT) & stop
    return seq, pos + 1, done


def run_both(logits, done=None, stop=None, slot=3):
    B = logits.shape[0]
    g = torch.Generator().manual_seed(B)
    seq = torch.randint(0, 100, (B, 12), generator=g)
    pos = torch.tensor([slot])
    done = torch.zeros(B, dtype=torch.bool) if done is None else done
    stop = torch.ones(B, dtype=torch.bool) if stop is None else stop
    want = reference(logits, seq, pos, done, stop)
    advance(logits, seq, pos, done, stop, FILLER, EOT)
    for got, ref in zip((seq, pos, done), want):
        assert torch.equal(got, ref)
    return seq[:, slot + 1]


@pytest.mark.parametrize("V", [1, 2, 15, 16, 17, 31, 33, 257, 2003, 50257])
def test_argmax_equals_torch_on_random_rows(V):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(3, V, generator=g) * 10
    run_both(logits)


@pytest.mark.parametrize("V", [17, 50, 1000])
def test_ties_take_the_first_index(V):
    logits = torch.zeros(4, V)
    logits[0, [3, V - 1]] = 2.0                    # same lane group and the tail
    logits[1, [V - 2, 1]] = 2.0
    logits[2] = 1.0                                # all equal: 0
    logits[3, [16 % V, 0]] = -0.0                  # -0.0 == 0.0: the first
    logits[3, 5:] = -1.0
    assert run_both(logits).tolist() == [3, 1, 0, 0]


@pytest.mark.parametrize("where", [0, 9, 16, 40, 47])
def test_nan_wins_like_torch(where):
    logits = torch.randn(2, 48)
    logits[0, where] = float("nan")
    logits[1, where] = float("nan")
    logits[1, 45] = float("nan")
    assert run_both(logits).tolist() == [where, min(where, 45)]


def test_all_minus_inf_and_infinities():
    logits = torch.full((3, 40), float("-inf"))
    logits[1, 22] = float("inf")
    logits[2, 39] = float("inf")
    logits[2, 38] = 1e38
    assert run_both(logits).tolist() == [0, 22, 39]


def test_done_rows_take_the_filler_and_eot_stops_only_where_asked():
    logits = torch.zeros(4, 20)
    logits[:, EOT] = 1.0                             # every row's argmax is EOT
    done = torch.tensor([True, False, False, True])
    stop = torch.tensor([True, True, False, False])
    nxt = run_both(logits, done=done, stop=stop)
    assert nxt.tolist() == [FILLER, EOT, EOT, FILLER]
    for flag in (True, False):                       # the engine's one stop_at_eot flag, broadcast
        run_both(logits, done=done.clone(), stop=torch.tensor([flag]))


def test_strided_seq_column_and_last_slot():
    logits = torch.randn(2, 30)
    seq = torch.zeros(2, 6, dtype=torch.long)
    pos = torch.tensor([4])                           # writes the last slot
    done, stop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    advance(logits, seq, pos, done, stop, FILLER, EOT)
    assert seq[:, 5].tolist() == logits.argmax(-1).tolist() and pos.item() == 5


def test_bad_inputs_give_clear_errors():
    logits, seq = torch.randn(2, 30), torch.zeros(2, 6, dtype=torch.long)
    done, stop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="outside seq"):
        advance(logits, seq, torch.tensor([5]), done, stop, FILLER, EOT)
    with pytest.raises(RuntimeError, match="logits must be"):
        advance(logits.double(), seq, torch.tensor([0]), done, stop, FILLER, EOT)
    with pytest.raises(RuntimeError, match="rows"):
        advance(torch.randn(3, 30), seq, torch.tensor([0]), done, stop, FILLER, EOT)
    with pytest.raises(RuntimeError, match="done"):
        advance(logits, seq, torch.tensor([0]), done.int(), stop, FILLER, EOT)
    with pytest.raises(RuntimeError, match="stop must have shape"):
        advance(logits, seq, torch.tensor([0]), done, torch.ones(3, dtype=torch.bool), FILLER, EOT)
    with pytest.raises(RuntimeError, match="contiguous"):
        advance(torch.randn(30, 2).t(), seq, torch.tensor([0]), done, stop, FILLER, EOT)


def test_engine_greedy_tokens_unchanged(monkeypatch):
    """The engine with the op == the engine with the ATen ops (has_advance off), ragged batch."""
    from gpt2_fast import GPT, GPTConfig
    from gpt2_fast.engine import Engine
    from lively import lively
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=2000, block_size=64)).eval()
    with torch.no_grad():
        lively(m, 100.0)
    prompts = [[464, 1290, 318, 257, 922, 1110], [40, 588], [1212, 318, 257]]

    def tokens(engine):
        return torch.stack(list(engine.generate_ids(prompts, 10, temperature=0)), 1).tolist()
    fast = Engine(m)
    calls = []
    got = tokens(fast)
    assert fast._cpu is not None and fast._cpu.has_advance
    orig = type(fast._cpu).advance_greedy
    monkeypatch.setattr(type(fast._cpu), "advance_greedy", lambda self, *a: calls.append(1) or orig(self, *a))
    assert tokens(fast) == got and len(calls) == 9   # one call per step after the first token
    fast._cpu.has_advance = False
    assert tokens(fast) == got and len(calls) == 9
