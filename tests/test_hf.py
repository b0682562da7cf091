"""HF parity: the same weights give the same logits in transformers' GPT2LMHeadModel and ours,
loaded both ways (HF save -> our load, our save -> HF load)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from gpt2_fast import GPT, GPTConfig  # noqa: E402

CONFIGS = [  # (n_layer, n_head, n_embd, vocab, n_positions)
    (2, 2, 32, 97, 16),
    (3, 4, 64, 50257, 64),
    (1, 12, 768, 50257, 1024),
    (2, 25, 1600, 50257, 64),
]


def hf_model(n_layer, n_head, n_embd, vocab, n_pos, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_pos)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and sets LN to identity: randomize everything
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def random_batches(vocab, block):
    yield torch.randint(0, vocab, (1, 1))
    yield torch.randint(0, vocab, (3, min(13, block)))
    yield torch.randint(0, vocab, (1, block))


@pytest.mark.parametrize("shape", CONFIGS, ids=lambda s: "x".join(map(str, s)))
def test_hf_to_ours_logits(shape, tmp_path):
    hf = hf_model(*shape)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.n_layer == shape[0] and ours.config.block_size == shape[4]
    with torch.no_grad():
        for idx in random_batches(shape[3], shape[4]):
            ref = hf(idx).logits
            got, _ = ours(idx)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", CONFIGS[:2], ids=lambda s: "x".join(map(str, s)))
def test_ours_to_hf_logits(shape, tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(n_layer=shape[0], n_head=shape[1], n_embd=shape[2], vocab_size=shape[3],
                         block_size=shape[4])).eval()
    ours.save_pretrained(str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, shape[3], (2, shape[4]))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_loss_matches_hf(tmp_path):
    hf = hf_model(*CONFIGS[1])
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 20))
    labels = idx.clone()
    with torch.no_grad():
        ref = hf(idx, labels=labels).loss  # HF shifts labels inside
        targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], 1)
        _, loss = ours(idx, targets)
        _, fused = ours(idx, targets, return_logits=False)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["bin", "sharded", "gpt2model_keys"])
def test_other_checkpoint_layouts(fmt, tmp_path):
    hf = hf_model(*CONFIGS[0])
    if fmt == "bin":
        hf.config.save_pretrained(tmp_path)  # transformers 5 writes only safetensors: save the .bin by hand
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    elif fmt == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:  # the hub's openai-community/gpt2 stores GPT2Model keys (no "transformer." prefix)
        body = GPT2Model(hf.config)
        body.load_state_dict(hf.transformer.state_dict())
        body.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_padded_vocab_never_leaks(tmp_path):
    hf = hf_model(*CONFIGS[0])
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), padded_vocab_size=128).eval()
    assert ours.transformer.wte.weight.shape[0] == 128
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        logits, _ = ours(idx)
        assert logits.shape[-1] == 97
        torch.testing.assert_close(logits, hf(idx).logits, atol=1e-5, rtol=1e-5)
        targets = torch.randint(0, 97, (2, 16))
        torch.testing.assert_close(ours(idx, targets, return_logits=False)[1], ours(idx, targets)[1])
    ours.save_pretrained(str(tmp_path / "out"))
    back = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"))
    assert back.transformer.wte.weight.shape[0] == 97


def test_dtype_and_tied_weights_after_load(tmp_path):
    hf_model(*CONFIGS[0]).save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())


def test_bad_checkpoints(tmp_path):
    hf = hf_model(*CONFIGS[0])
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"][:, :7].contiguous()
    del sd["transformer.ln_f.bias"]
    sd["transformer.extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "transformer.ln_f.bias" in msg and "transformer.extra.weight" in msg and "c_fc.weight" in msg
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gelu_new"):
        GPT.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))


def test_unknown_name_and_offline_preset(monkeypatch):
    with pytest.raises(ValueError, match="neither a local directory nor a GPT-2 preset"):
        GPT.from_pretrained("gpt3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(RuntimeError, match="pass a local directory"):
        GPT.from_pretrained("gpt2-xl")


def test_untied_lm_head_both_ways(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16, tie_word_embeddings=False)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.tie_word_embeddings is False
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=1e-5)
        targets = torch.randint(0, 97, (2, 16))
        torch.testing.assert_close(ours(idx, targets, return_logits=False)[1], ours(idx, targets)[1])
        padded = GPT.from_pretrained(str(tmp_path), padded_vocab_size=128).eval()
        torch.testing.assert_close(padded(idx)[0], ref, atol=1e-5, rtol=1e-5)
    padded.save_pretrained(str(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is False
    back = GPT2LMHeadModel.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ref, atol=1e-5, rtol=1e-5)
    from safetensors.torch import load_file, save_file  # untied config, but no lm_head in the file
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="tie_word_embeddings=false.*no lm_head.weight"):
        GPT.from_pretrained(str(tmp_path))


def test_corrupt_weight_files_name_the_file(tmp_path):
    hf = hf_model(*CONFIGS[0])
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    good = st.read_bytes()
    for bad in (good[:len(good) // 2], b"garbage" * 10, b""):
        st.write_bytes(bad)
        with pytest.raises(ValueError, match="model.safetensors: corrupt, truncated or not a weight file"):
            GPT.from_pretrained(str(tmp_path))
    st.unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    good = (tmp_path / "pytorch_model.bin").read_bytes()
    for bad in (good[:len(good) // 2], b""):
        (tmp_path / "pytorch_model.bin").write_bytes(bad)
        with pytest.raises(ValueError, match="pytorch_model.bin: corrupt, truncated"):
            GPT.from_pretrained(str(tmp_path))


def test_invalid_config_json_names_the_file(tmp_path):
    hf_model(*CONFIGS[0]).save_pretrained(tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: invalid JSON"):
        GPT.from_pretrained(str(tmp_path))
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"config.json: not an HF GPT-2 config: missing \['n_head'"):
        GPT.from_pretrained(str(tmp_path))


def test_save_pretrained_writes_a_tokenizer_autotokenizer_loads(tmp_path):
    from transformers import AutoTokenizer

    from gpt2_fast import get_tokenizer
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).exists(), name
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = get_tokenizer()
    texts = ["Hello world", "  leading spaces and\n\nnewlines\t tabs", "It's 1234 o'clock; we'll see!",
             "naïve café — 日本語 🙂", "<|endoftext|>between<|endoftext|>", "ĠĊ odd bytes \x00\x7f"]
    for t in texts:
        assert hf_tok.encode(t) == ours.encode(t), t
        assert hf_tok.decode(ours.encode(t)) == t
    assert hf_tok.eos_token_id == 50256 and hf_tok.model_max_length == 64
    # every id decodes to the same bytes (the vocabulary), and a longer text encodes the same (merges)
    from gpt2_fast.data import DEFAULT_CORPUS, read_text
    text = read_text(DEFAULT_CORPUS)[:20000]
    assert hf_tok.encode(text) == ours.encode(text)
    byte_decoder = {c: b for b, c in __import__("gpt2_fast.tokenizer", fromlist=["x"]).bytes_to_unicode().items()}
    toks = hf_tok.convert_ids_to_tokens(list(range(50256)))
    assert all(bytes(byte_decoder[c] for c in s) == ours.decode_bytes([i]) for i, s in enumerate(toks))
