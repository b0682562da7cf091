"""gpt2_fast.data: shard format, `prepare`, the memory-mapped loader, the unigram baseline."""
import gzip
import json
import os

import numpy as np
import pytest

from gpt2_fast import data as D
from gpt2_fast.tokenizer import EOT_TOKEN, get_tokenizer


def kjv_text(n_chars: int) -> str:
    with gzip.open(D.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        return f.read(n_chars)


# -- shards ------------------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 4099):
        tokens = rng.integers(0, 50257, n).astype(np.uint16)
        if n:
            tokens[0], tokens[-1] = 0, EOT_TOKEN
        p = str(tmp_path / f"x_train_{n:06d}.bin")
        D.write_shard(p, tokens)
        assert os.path.getsize(p) == D.HEADER_BYTES + 2 * n
        header = np.fromfile(p, dtype="<i4", count=3)
        assert header.tolist() == [D.MAGIC, D.VERSION, n]
        np.testing.assert_array_equal(D.read_shard(p), tokens)


def test_shard_errors(tmp_path):
    p = str(tmp_path / "a_train_000000.bin")
    D.write_shard(p, np.arange(100, dtype=np.uint16))
    with open(p, "r+b") as f:
        f.truncate(D.HEADER_BYTES + 150)
    with pytest.raises(ValueError, match="truncated or corrupt shard"):
        D.read_shard(p)
    bad = tmp_path / "b_train_000000.bin"
    bad.write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match="magic"):
        D.read_shard(str(bad))
    with pytest.raises(ValueError, match="uint16"):
        D.write_shard(p, np.array([70000]))
    with pytest.raises(FileNotFoundError, match="gpt2-fast prepare"):
        D.shard_paths(str(tmp_path / "nothing"), "train")


# -- prepare -----------------------------------------------------------------------------------

def test_prepare_formats_and_eot(tmp_path):
    docs = ["First document.\nWith two lines.", "Second: café, ünïcode ✓", "third <|endoftext|> literal"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(docs[0], encoding="utf-8")
    with gzip.open(tmp_path / "in" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[1])
    with open(tmp_path / "in" / "c.jsonl", "w") as f:
        f.write(json.dumps({"text": docs[2], "id": 1}) + "\n\n" + json.dumps({"text": docs[0]}) + "\n")
    meta = D.prepare([str(tmp_path / "in")], str(tmp_path / "out"), name="t", val_fraction=0.0,
                     progress=False)
    tok = get_tokenizer()
    expected = []
    for d in [docs[0], docs[1], docs[2], docs[0]]:  # folder order a, b, c; jsonl has 2 documents
        expected += [EOT_TOKEN] + tok.encode(d, allow_special=False)
    got = np.concatenate([D.read_shard(p) for p in D.shard_paths(str(tmp_path / "out"), "train")])
    assert got.tolist() == expected
    assert meta["documents"] == 4 and meta["tokens"] == {"train": len(expected), "val": 0}
    assert tok.decode(got[-len(tok.encode(docs[0])):].tolist()) == docs[0]


def test_prepare_split_and_shards_cover_the_stream(tmp_path):
    text = kjv_text(120_000)
    src = tmp_path / "kjv.txt"
    src.write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    meta = D.prepare([str(src)], out, val_fraction=0.25, shard_tokens=5000, progress=False)
    stream = [EOT_TOKEN] + get_tokenizer().encode(text, allow_special=False)
    train = np.concatenate([D.read_shard(p) for p in D.shard_paths(out, "train")])
    val = np.concatenate([D.read_shard(p) for p in D.shard_paths(out, "val")])
    assert len(D.shard_paths(out, "train")) == -(-train.size // 5000)
    # rebuild the stream: of every 4 blocks of SPLIT_BLOCK tokens, the 4th went to val
    rebuilt, ti, vi = [], 0, 0
    for b in range(-(-len(stream) // D.SPLIT_BLOCK)):
        n = min(D.SPLIT_BLOCK, len(stream) - b * D.SPLIT_BLOCK)
        if b % 4 == 3:
            rebuilt += val[vi:vi + n].tolist()
            vi += n
        else:
            rebuilt += train[ti:ti + n].tolist()
            ti += n
    assert rebuilt == stream and ti == train.size and vi == val.size > 0
    assert meta["tokens"] == {"train": train.size, "val": val.size}


def test_parallel_split_points_keep_the_tokenization(monkeypatch):
    tok = get_tokenizer()
    base = kjv_text(150_000)
    text = base.replace(". ", ".\n  ").replace(":", "\n\n") + "\n \n\t x\n\n\n" + base
    pieces = D._split_points(text, 7)
    assert len(pieces) > 1 and "".join(pieces) == text
    monkeypatch.setattr(D, "PARALLEL_MIN_CHARS", 1000)
    (ids,) = D.encode_documents([text], num_threads=2)
    assert ids.tolist() == tok.encode(text, allow_special=False)


def test_prepare_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        D.prepare([str(empty)], str(tmp_path / "o"), progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8.*offset 3"):
        D.prepare([str(latin1)], str(tmp_path / "o"), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.prepare([str(tmp_path / "missing.txt")], str(tmp_path / "o"), progress=False)
    bad_jsonl = tmp_path / "b.jsonl"
    bad_jsonl.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        D.prepare([str(bad_jsonl)], str(tmp_path / "o"), progress=False)
    ok = tmp_path / "ok.txt"
    ok.write_text("hello")
    with pytest.raises(ValueError, match="val_fraction"):
        D.prepare([str(ok)], str(tmp_path / "o"), val_fraction=0.7, progress=False)


# -- loader ------------------------------------------------------------------------------------

def _shards(tmp_path, tokens, shard_tokens):
    out = tmp_path / "shards"
    out.mkdir(exist_ok=True)
    for i in range(0, len(tokens), shard_tokens):
        D.write_shard(str(out / f"s_train_{i // shard_tokens:06d}.bin"), tokens[i:i + shard_tokens])
    return str(out)


@pytest.mark.parametrize("world", [1, 2])
def test_sequential_covers_every_token_once_per_epoch(tmp_path, world):
    B, T, steps = 3, 5, 4
    n = world * B * T * steps + 1
    tokens = np.random.default_rng(1).integers(0, 50257, n).astype(np.uint16)
    folder = _shards(tmp_path, tokens, shard_tokens=37)  # windows straddle shard boundaries
    loaders = [D.TokenLoader(folder, "train", B, T, "sequential", rank=r, world_size=world)
               for r in range(world)]
    assert loaders[0].batches_per_epoch() == steps
    xs, ys = [], []
    for _ in range(steps):
        for ld in loaders:
            x, y = ld.next_batch()
            assert x.shape == y.shape == (B, T)
            assert (x[:, 1:] == y[:, :-1]).all()
            xs.append(x.reshape(-1))
            ys.append(y.reshape(-1))
    import torch
    assert torch.cat(xs).tolist() == tokens[:-1].tolist()
    assert torch.cat(ys).tolist() == tokens[1:].tolist()
    assert loaders[0].state_dict()["epoch"] == 0
    x, _ = loaders[0].next_batch()  # next epoch starts over
    assert loaders[0].state.epoch == 1 and x[0].tolist() == tokens[:T].tolist()


def test_random_order_is_a_permutation_and_resumes(tmp_path):
    B, T = 2, 8
    tokens = np.arange(1, 2000, dtype=np.uint16)
    folder = _shards(tmp_path, tokens, shard_tokens=500)
    ld = D.TokenLoader(folder, "train", B, T, "random", seed=3)
    starts = []
    for _ in range(ld.batches_per_epoch()):
        x, y = ld.next_batch()
        assert (y == x + 1).all()  # windows are contiguous slices of the stream
        starts += x[:, 0].tolist()
    offset = starts[0] - 1 - T * ((starts[0] - 1) // T)
    n_windows = (tokens.size - 1 - offset) // T
    assert sorted(starts)[:len(starts)] == sorted(starts) and len(set(starts)) == len(starts)
    assert all((s - 1 - offset) % T == 0 for s in starts)
    assert len(starts) == n_windows - n_windows % B
    # resume: a fresh loader with the saved state yields the same batches
    a = D.TokenLoader(folder, "train", B, T, "random", seed=3)
    for _ in range(70):  # past an epoch boundary
        a.next_batch()
    b = D.TokenLoader(folder, "train", B, T, "random", seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert all((u == v).all() for u, v in zip(a.next_batch(), b.next_batch()))
    c = D.TokenLoader(folder, "train", B, T, "sequential", seed=3)
    with pytest.raises(ValueError, match="order"):
        c.load_state_dict(a.state_dict())


def test_loader_bad_input(tmp_path):
    folder = _shards(tmp_path, np.arange(100, dtype=np.uint16), 100)
    with pytest.raises(ValueError, match=r"fewer than one batch needs: world_size 1 x batch_size 4 x seq_len 32"):
        D.TokenLoader(folder, "train", 4, 32)
    with pytest.raises(ValueError, match="order"):
        D.TokenLoader(folder, "train", 1, 8, order="shuffled")
    with pytest.raises(ValueError, match="rank"):
        D.TokenLoader(folder, "train", 1, 8, rank=2, world_size=2)


def test_unigram_baseline_by_hand(tmp_path):
    train = np.array([5, 5, 5, 7], dtype=np.uint16)
    val = np.array([5, 7, 9], dtype=np.uint16)
    D.write_shard(str(tmp_path / "u_train_000000.bin"), train)
    D.write_shard(str(tmp_path / "u_val_000000.bin"), val)
    V = 50257
    p = lambda c: (c + 1) / (4 + V)  # noqa: E731  (add-one smoothing)
    want = -(np.log(p(3)) + np.log(p(1)) + np.log(p(0))) / 3
    assert D.unigram_baseline(str(tmp_path))["loss"] == pytest.approx(want, rel=1e-12)
