"""gpt2_fast.eval: sliding-window perplexity, LAMBADA, the task harness, each against a by-hand
computation with one full forward per scored token."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2_fast import eval as E
from gpt2_fast.config import GPTConfig
from gpt2_fast.model import GPT
from gpt2_fast.tokenizer import EOT_TOKEN, get_tokenizer

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and "
        "void; and darkness was upon the face of the deep. Café ✓ — naïve.")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()


def logprobs_next(model, context):
    with torch.no_grad():
        logits, _ = model(torch.tensor([context]))
    return F.log_softmax(logits[0, -1].double(), dim=-1)


@pytest.mark.parametrize("max_length,stride", [(16, 5), (16, 8), (16, 15), (7, 3)])
def test_perplexity_is_exp_mean_nll_by_hand(model, max_length, stride):
    ids = [EOT_TOKEN] + get_tokenizer().encode(TEXT)
    assert len(ids) > 2 * max_length
    nll = []
    for i in range(1, len(ids)):
        k = max(0, math.ceil((i + 1 - max_length) / stride))  # the first window holding token i
        nll.append(-float(logprobs_next(model, ids[k * stride:i])[ids[i]]))
    got = E.perplexity(model, TEXT, max_length=max_length, stride=stride, batch_size=3)
    mean = sum(nll) / len(nll)
    assert got["tokens"] == len(ids) - 1
    assert got["loss"] == pytest.approx(mean, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)
    assert got["bpb"] == pytest.approx(sum(nll) / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)


def test_one_window_equals_plain_cross_entropy(model):
    text = "And God said, Let there be light"
    ids = [EOT_TOKEN] + get_tokenizer().encode(text)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    ce = F.cross_entropy(logits[0].double(), torch.tensor(ids[1:]))
    assert E.perplexity(model, text)["loss"] == pytest.approx(float(ce), rel=1e-5)


def greedy_by_hand(model, ctx, n):
    out = []
    for _ in range(n):
        out.append(int(logprobs_next(model, ctx + out).argmax()))
    return out


def test_score_continuations_by_hand(model):
    tok = get_tokenizer()
    ctx = tok.encode("And the earth was")
    greedy = greedy_by_hand(model, ctx, 3)
    other = [(greedy[0] + 1) % 50257] + greedy[1:]
    res = E.score_continuations(model, [(ctx, greedy), (ctx, other), (ctx[:2], greedy[:1])], batch_size=2)
    assert [g for _, g in res] == [True, False, greedy_by_hand(model, ctx[:2], 1) == greedy[:1]]
    for (nll, _), cont in zip(res[:2], (greedy, other)):
        want = -sum(float(logprobs_next(model, ctx + cont[:j])[cont[j]]) for j in range(len(cont)))
        assert nll == pytest.approx(want, rel=1e-5)


def test_lambada_and_choice_by_hand(model, tmp_path):
    tok = get_tokenizer()
    passages = ["And God called the light Day", "the evening and the morning were the first day",
                "And God saw the light, that it was good"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    nlls, hits = [], 0
    for p in passages:
        ctx, word = p.rsplit(" ", 1)
        c, t = tok.encode(ctx), tok.encode(" " + word)
        hits += greedy_by_hand(model, c, len(t)) == t
        nlls.append(-sum(float(logprobs_next(model, c + t[:j])[t[j]]) for j in range(len(t))))
    got = E.lambada(model, str(path), batch_size=2)
    assert got["n"] == 3 and got["acc"] == hits / 3
    assert got["ppl"] == pytest.approx(math.exp(sum(nlls) / 3), rel=1e-5)

    rows = [{"context": "And God said", "choices": [" Let", " banana", " the"], "label": 0},
            {"context": "In the", "choices": [" beginning", " end"], "label": 1}]
    cpath = tmp_path / "choice.jsonl"
    cpath.write_text("".join(json.dumps(r) + "\n" for r in rows))
    correct = 0
    for r in rows:
        c = tok.encode(r["context"])
        scores = []
        for ch in r["choices"]:
            t = tok.encode(ch)
            scores.append(-sum(float(logprobs_next(model, c + t[:j])[t[j]]) for j in range(len(t))))
        correct += min(range(len(scores)), key=scores.__getitem__) == r["label"]
    assert E.run_task(model, "choice", str(cpath))["acc"] == correct / 2


def test_eval_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="stride must be in"):
        E.perplexity(model, TEXT, max_length=8, stride=9)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, block_size=16\]"):
        E.perplexity(model, TEXT, max_length=17)
    with pytest.raises(ValueError, match="every token is scored"):
        E.perplexity(model, TEXT, max_length=8, stride=8)
    with pytest.raises(FileNotFoundError):
        E.lambada(model, str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"passage": "x y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected fields \['text'\]"):
        E.lambada(model, str(bad))
    with pytest.raises(ValueError, match="unknown task"):
        E.run_task(model, "hellaswag", str(bad))


def test_detokenizers():
    wiki = " = = Gameplay = = \n The game @-@ play , which ( as noted ) cost 1 @,@ 000 , was \" fun \" ."
    assert E.detokenize_wikitext(wiki) == ' == Gameplay ==\nThe game-play, which (as noted) cost 1,000, was "fun" .'
    assert E.detokenize_ptb("it does n't rise N % , he 's sure . \n") == "it doesn't rise N%, he's sure.\n"


def _nll_by_hand(model, ctx, cont):
    """NLL of cont after ctx from one plain forward of ctx + cont (no batching, no padding)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont[:-1]]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    return -sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


HELLASWAG = [  # llm.c's fields (plus some it ignores), hand-made
    {"ind": 1, "activity_label": "Bible", "ctx": "And God said, Let there be", "label": 0,
     "endings": ["light: and there was light.", "a banana", "cows", "the firmament in the midst of the waters"]},
    {"ind": 2, "ctx": "In the beginning", "label": "2",
     "endings": ["God created the heaven and the earth.", "was", "the end", "of days and nights and more words"]},
    {"ind": 3, "ctx": "The evening and the morning were", "label": 3,
     "endings": ["the first day", "x", "green and fast and very loud indeed", "day"]},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hellaswag_matches_a_direct_computation(model, tmp_path):
    from gpt2_fast.hellaswag import hellaswag
    tok = get_tokenizer()
    path = _write_jsonl(tmp_path / "hs.jsonl", HELLASWAG)
    right = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for ex in HELLASWAG:
        ctx = tok.encode(ex["ctx"])
        conts = [tok.encode(" " + e) for e in ex["endings"]]
        nll = [_nll_by_hand(model, ctx, c) for c in conts]
        per = {"acc": nll, "acc_norm": [n / len(c) for n, c in zip(nll, conts)],
               "acc_bytes": [n / len((" " + e).encode()) for n, e in zip(nll, ex["endings"])]}
        for k, v in per.items():
            right[k] += min(range(4), key=v.__getitem__) == int(ex["label"])
    got = hellaswag(model, path, batch_size=3)
    assert got == {k: v / 3 for k, v in right.items()} | {"n": 3}


def test_hellaswag_predictable_with_a_uniform_model(tmp_path):
    """All weights zero: every token has log-prob -ln V, so the sum picks the ending with the fewest
    tokens, and per-token scores all tie (the first ending wins, as argmin in llm.c)."""
    from gpt2_fast.hellaswag import hellaswag
    uniform = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    with torch.no_grad():
        for p in uniform.parameters():
            p.zero_()
    path = _write_jsonl(tmp_path / "hs.jsonl", HELLASWAG)  # fewest tokens: ending 2, 1, 1; labels 0, 2, 3
    assert hellaswag(uniform, path) == {"acc": 0.0, "acc_norm": 1 / 3, "acc_bytes": 0.0, "n": 3}
    bad = dict(HELLASWAG[0], label=4)
    with pytest.raises(ValueError, match=r"example 1: 'label' must index 'endings'"):
        hellaswag(uniform, _write_jsonl(tmp_path / "bad.jsonl", [bad]))
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: expected fields \['ctx', 'endings', 'label'\]"):
        hellaswag(uniform, _write_jsonl(tmp_path / "bad2.jsonl", [{"ctx": "x"}]))


def test_lambada_last_word_after_any_whitespace():
    assert E.split_last_word("He said\nhello") == ("He said", " hello")
    assert E.split_last_word("a b\t\tc \n") == ("a b", " c")
    with pytest.raises(ValueError, match="context and a last word"):
        E.split_last_word("  alone\n")


def test_choice_normalisations(model, tmp_path):
    tok = get_tokenizer()
    rows = [{"context": "And God said", "choices": [" Let there be light", " banana", " the"], "label": 0},
            {"context": "In the", "choices": [" beginning", " end of all things"], "label": 1}]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    sizes = {"sum": lambda s: 1, "token": lambda s: len(tok.encode(s)), "byte": lambda s: len(s.encode())}
    nll = [[_nll_by_hand(model, tok.encode(r["context"]), tok.encode(ch)) for ch in r["choices"]] for r in rows]
    for norm, size in sizes.items():
        correct = 0
        for r, row_nll in zip(rows, nll):
            scores = [n / size(ch) for n, ch in zip(row_nll, r["choices"])]
            correct += min(range(len(scores)), key=scores.__getitem__) == r["label"]
        assert E.choice(model, path, norm=norm) == {"acc": correct / 2, "n": 2, "norm": norm}
    with pytest.raises(ValueError, match="norm must be one of"):
        E.choice(model, path, norm="char")


def test_val_loss_is_the_mean_over_every_val_token(model, tmp_path):
    from gpt2_fast.data import write_shard
    import numpy as np
    gen = np.random.default_rng(0)
    a, b = gen.integers(0, 50257, 23), gen.integers(0, 50257, 18)  # 41 tokens over two shards
    write_shard(str(tmp_path / "x_val_000000.bin"), a.astype(np.uint16))
    write_shard(str(tmp_path / "x_val_000001.bin"), b.astype(np.uint16))
    write_shard(str(tmp_path / "x_train_000000.bin"), a.astype(np.uint16))
    ids = np.concatenate([a, b]).tolist()
    nll = []  # windows of 17 tokens every 16: positions 1..40 each once, context from their window start
    for start in range(0, 40, 16):
        window = ids[start:start + 17]
        nll.append(_nll_by_hand(model, window[:1], window[1:]))  # the window's total NLL
    got = E.val_loss(model, str(tmp_path), batch_size=2)
    assert got["tokens"] == 40 and got["shards"] == 2
    assert got["loss"] == pytest.approx(sum(nll) / 40, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / 40), rel=1e-5)
    assert E.val_loss(model, str(tmp_path), max_length=8, limit=10)["tokens"] == 10


def test_progress_bar_on_request(model, capsys):
    E.perplexity(model, TEXT, max_length=8, stride=4, progress=True)
    assert "perplexity" in capsys.readouterr().err
    E.perplexity(model, TEXT, max_length=8, stride=4)
    assert capsys.readouterr().err == ""
