"""gpt2_fast.data (data_shards, data_text, data_tokenize, data_prepare, data_loader): shard format,
`prepare`, the memory-mapped loader, the unigram baseline."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_fast import data as D
from gpt2_fast import data_prepare, data_text, data_tokenize, owned_tmpdir
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
    pieces = data_tokenize._split_points(text, 7)
    assert len(pieces) > 1 and "".join(pieces) == text
    monkeypatch.setattr(data_tokenize, "PARALLEL_MIN_CHARS", 1000)
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


# -- prepare never loses data, never mixes corpora ---------------------------------------------

def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _good_corpus(tmp_path, name="corpus.txt", n=30_000):
    src = tmp_path / name
    src.write_text(kjv_text(n), encoding="utf-8")
    return src


@pytest.mark.parametrize("bad", ["binary", "bad_jsonl", "empty", "interrupt"])
def test_failed_prepare_keeps_the_previous_shards(tmp_path, monkeypatch, bad):
    out = tmp_path / "out"
    D.prepare([str(_good_corpus(tmp_path))], str(out), name="c", shard_tokens=2000, progress=False)
    before = _snapshot(out)
    if bad == "binary":
        src = tmp_path / "c.txt"
        src.write_bytes(b"ok text " * 100 + bytes(range(256)))
    elif bad == "bad_jsonl":
        src = tmp_path / "c.jsonl"
        src.write_text('{"text": "fine"}\n{"text": \n')
    elif bad == "empty":
        src = tmp_path / "c.txt"
        src.write_text("")
    else:
        src = _good_corpus(tmp_path, "c.txt", 60_000)
        calls = []

        def interrupted(*a, **k):
            calls.append(1)
            raise KeyboardInterrupt
        monkeypatch.setattr(data_tokenize, "encode_documents", interrupted)
    with pytest.raises((ValueError, KeyboardInterrupt)):
        D.prepare([str(src)], str(out), name="c", shard_tokens=2000, progress=False)
    assert _snapshot(out) == before  # same files, same bytes, no temp folder left
    assert D.shard_paths(str(out), "train")


_KILLED_PREPARE = ("import os, signal, sys\n"
                   "from gpt2_fast import data_prepare as P, owned_tmpdir\n"
                   "path = owned_tmpdir.make_owned_tmpdir(sys.argv[1], P.TMP_PREFIX, P.TOOL)\n"
                   "open(os.path.join(path, 'c_train_000000.bin'), 'wb').write(b'half a shard')\n"
                   "print(path, flush=True)\n"
                   "os.kill(os.getpid(), signal.SIGKILL)\n")


def test_prepare_removes_only_a_killed_prepares_temp_folder(tmp_path, capsys):
    """A SIGKILLed prepare leaves its temp folder; the next prepare into that folder removes it, and
    only it: not a live process's, not another host's or tool's, not one without an owner file."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = proc.stdout.strip()
    owner = json.loads((Path(killed) / owned_tmpdir.OWNER_FILE).read_text())
    assert owner["pid"] != os.getpid() and not owned_tmpdir.pid_alive(owner["pid"])

    def copy(name, **change):  # the killed run's folder with its owner file changed
        path = out / (data_prepare.TMP_PREFIX + name)
        shutil.copytree(killed, path)
        (path / owned_tmpdir.OWNER_FILE).write_text(json.dumps(dict(owner, **change)))
        return path
    kept = [copy("me", pid=os.getpid()), copy("parent", pid=os.getppid()), copy("elsewhere", host="other-host"),
            copy("other-ns", pid_ns="pid:[1]"), copy("other-tool", tool="someone else")]
    foreign = out / (data_prepare.TMP_PREFIX + "no-owner")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    capsys.readouterr()
    D.prepare([str(_good_corpus(tmp_path))], str(out), name="c", shard_tokens=2000, progress=False)
    err = capsys.readouterr().err
    assert not os.path.exists(killed) and f"removed {killed}, left by an earlier gpt2-fast prepare" in err
    assert all(sorted(os.listdir(p)) == [owned_tmpdir.OWNER_FILE, "c_train_000000.bin"] for p in kept)
    assert (foreign / "notes.txt").read_text() == "not ours" and f"left alone: {foreign}" in err
    hidden = sorted(n for n in os.listdir(out) if n.startswith("."))
    assert hidden == sorted(p.name for p in kept + [foreign])  # this run's own temp folder is gone too


def test_prepare_replaces_its_own_corpus_only_after_success(tmp_path):
    out = tmp_path / "out"
    D.prepare([str(_good_corpus(tmp_path, n=60_000))], str(out), name="c", shard_tokens=2000, progress=False)
    many = len(D.shard_paths(str(out), "train"))
    meta = D.prepare([str(_good_corpus(tmp_path, "small.txt", 9_000))], str(out), name="c",
                     shard_tokens=2000, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(meta["shards"]["train"] + meta["shards"]["val"] + ["c_unigram.npy", "meta.json"])
    assert len(meta["shards"]["train"]) < many


def test_two_corpora_in_one_folder_are_refused(tmp_path, capsys):
    from gpt2_fast.cli import main
    out = tmp_path / "out"
    D.prepare([str(_good_corpus(tmp_path, "a.txt"))], str(out), progress=False)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="already holds the prepared corpus 'a'.*--replace"):
        D.prepare([str(_good_corpus(tmp_path, "b.txt"))], str(out), progress=False)
    assert main(["prepare", str(tmp_path / "b.txt"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-fast prepare: error: ") and err.count("\n") == 1
    assert _snapshot(out) == before
    # the loader reads exactly what meta.json lists: a stray shard is ignored
    D.write_shard(str(out / "a_train_000099.bin"), np.arange(10, dtype=np.uint16))
    assert "a_train_000099.bin" not in [os.path.basename(p) for p in D.shard_paths(str(out), "train")]
    assert main(["prepare", str(tmp_path / "b.txt"), "--out", str(out), "--no-progress", "--replace"]) == 0
    assert all(os.path.basename(p).startswith("b_") for p in D.shard_paths(str(out), "train"))
    assert not (out / "a_train_000000.bin").exists() and not (out / "a_unigram.npy").exists()
    assert (out / "a_train_000099.bin").exists()  # not listed by a's meta.json: not ours to delete
    os.remove(out / "b_train_000000.bin")
    with pytest.raises(FileNotFoundError, match="meta.json lists .*b_train_000000.bin"):
        D.shard_paths(str(out), "train")


def test_folder_of_foreign_shards_is_refused_and_mixed_folders_named(tmp_path):
    llmc = tmp_path / "llmc"
    llmc.mkdir()
    D.write_shard(str(llmc / "x_train_000000.bin"), np.arange(100, dtype=np.uint16))
    with pytest.raises(FileExistsError, match="no meta.json describes"):
        D.prepare([str(_good_corpus(tmp_path))], str(llmc), progress=False)
    D.write_shard(str(llmc / "y_train.bin"), np.arange(100, dtype=np.uint16))
    with pytest.raises(ValueError, match="shards of 2 corpora"):
        D.shard_paths(str(llmc), "train")


def test_llmc_single_file_shards(tmp_path):
    """llm.c's tinyshakespeare layout: tiny_shakespeare_train.bin + tiny_shakespeare_val.bin."""
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    train, val = str(folder / "tiny_shakespeare_train.bin"), str(folder / "tiny_shakespeare_val.bin")
    D.write_shard(train, np.arange(300, dtype=np.uint16))
    D.write_shard(val, np.arange(100, dtype=np.uint16))
    for spec in (str(folder), train, str(folder / "tiny_shakespeare_*.bin")):
        assert D.shard_paths(spec, "train") == [train] and D.shard_paths(spec, "val") == [val], spec
    x, y = D.TokenLoader(train, "train", 2, 8).next_batch()
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))
    assert D.TokenLoader(train, "val", 1, 8).n_tokens == 100
    os.remove(val)
    with pytest.raises(FileNotFoundError, match="tiny_shakespeare_val.bin"):
        D.shard_paths(train, "val")
    odd = tmp_path / "tokens.bin"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="NAME_train.bin"):
        D.shard_paths(str(odd), "train")


# -- prepare streams ---------------------------------------------------------------------------

def test_streamed_pieces_tokenize_like_the_whole_text(tmp_path, monkeypatch):
    tok = get_tokenizer()
    text = (kjv_text(20_000).replace(". ", ".  \n\t ") + " \n \n   x  y\r\n  ") * 2 + "end"
    src = tmp_path / "w.txt"
    src.write_text(text, encoding="utf-8")
    monkeypatch.setattr(data_text, "READ_CHUNK_BYTES", 997)   # cuts everywhere, even inside UTF-8 characters
    monkeypatch.setattr(data_tokenize, "BATCH_CHARS", 3000)
    pieces = list(D.iter_pieces(str(src)))
    assert len(pieces) > 20 and [p[0] for p in pieces].count(True) == 1
    assert "".join(p for _, p in pieces) == text
    meta = D.prepare([str(src)], str(tmp_path / "o"), val_fraction=0.0, progress=False)
    got = np.concatenate([D.read_shard(p) for p in D.shard_paths(str(tmp_path / "o"), "train")])
    assert got.tolist() == [EOT_TOKEN] + tok.encode(text, allow_special=False)
    assert meta["documents"] == 1 and meta["text_bytes"] == len(text.encode())


def test_prepare_memory_is_bounded_by_the_chunk_not_the_file(tmp_path, monkeypatch):
    """Peak Python memory (tracemalloc) of prepare on a file 4x larger stays the same (about 1 MB:
    mostly the two 400 kB unigram count arrays), and under the file's size: reading the file whole
    would cost more than its size."""
    import tracemalloc
    monkeypatch.setattr(data_text, "READ_CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(data_tokenize, "BATCH_CHARS", 32 << 10)
    get_tokenizer()  # built before measuring
    line = json.dumps({"text": kjv_text(2_000)}) + "\n"
    peaks = {}
    for n_lines in (200, 800):
        src = tmp_path / f"in{n_lines}.jsonl"
        src.write_text(line * n_lines)
        tracemalloc.start()
        try:
            meta = D.prepare([str(src)], str(tmp_path / f"o{n_lines}"), shard_tokens=20_000, progress=False)
            peaks[n_lines] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert meta["documents"] == n_lines
    size = os.path.getsize(tmp_path / "in800.jsonl")
    assert peaks[800] < 1.25 * peaks[200] and peaks[800] < size, (peaks, size)


def test_unreadable_meta_json_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{broken")
    with pytest.raises(FileExistsError, match="meta.json: unreadable.*move that meta.json away"):
        D.prepare([str(_good_corpus(tmp_path))], str(out), progress=False)
    assert (out / "meta.json").read_text() == "{broken"
    with pytest.raises(ValueError, match="meta.json: unreadable"):
        D.shard_paths(str(out), "train")


def test_safe_cut_points():
    assert D.safe_cut("ab cd  ef") == 5 and D.safe_cut("ab cd  ef", lo=5) == 0
    assert D.safe_cut("abc") == 0 and D.safe_cut("  x") == 0 and D.safe_cut("x\n") == 1
    pieces = list(data_text._text_pieces(["aaa", "bbb", " cc", "c dd"]))  # a run without spaces is carried
    assert "".join(pieces) == "aaabbb ccc dd" and pieces[0] == "aaabbb"
