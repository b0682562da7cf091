import gzip
import os
import shutil

import pytest

from gpt2_fast import get_tokenizer
from gpt2_fast.tokenizer import PAT_STR, RANKS_PATH, Tokenizer

tiktoken = pytest.importorskip("tiktoken")
SHARED_KJV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kjv.txt.gz")
PACKAGE_KJV = os.path.join(os.path.dirname(RANKS_PATH), "kjv.txt.gz")

SAMPLES = [
    "", "Hello world", "hello  world   \n\n\t  end", "I'm you're we'll they've she'd it's DON'T",
    "3.14159 1,000,000 2026-11-26 0x1F", "naïve café — déjà vu 😀 日本語のテキスト Ελληνικά",
    "   leading and trailing   ", "a<|endoftext|>b", "\u00a0nbsp\u200bzero-width", "!!!???...",
]


@pytest.fixture(scope="module")
def official():
    """tiktoken's own loader over the same vendored ranks file."""
    from tiktoken.load import load_tiktoken_bpe
    return tiktoken.Encoding(name="gpt2-ref", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_bpe(RANKS_PATH),
                             special_tokens={"<|endoftext|>": 50256})


def test_known_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [50256]
    assert (tok.eot_token, tok.n_vocab) == (50256, 50257)


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_tiktoken(official, text):
    tok = get_tokenizer()
    assert tok.encode(text) == official.encode(text, allowed_special="all")
    assert tok.encode(text, allow_special=False) == official.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode():
    tok = get_tokenizer()
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def test_round_trip_on_real_text(official):
    path = PACKAGE_KJV if os.path.exists(PACKAGE_KJV) else SHARED_KJV
    if not os.path.exists(path):
        pytest.skip(f"no KJV corpus at {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read(300_000)
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert ids == official.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    assert 0.15 < len(ids) / len(text) < 0.35  # English: about 4 characters a token


def test_bad_ids_and_types():
    tok = get_tokenizer()
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        tok.decode([15496, 50257])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


def test_corrupt_ranks_file(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(RANKS_PATH, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    with pytest.raises(ValueError, match="corrupt"):
        Tokenizer(str(bad))
