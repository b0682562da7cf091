"""gpt2_fast/identity.py: the per-call identity of a model's tensors sees every replacement the
engine's and the CPU decoder's caches must notice, and nothing else."""
import torch
from torch import nn

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.identity import tensor_identity, walk_modules
from gpt2_fast.model import KVCache


def small():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16)).eval()


def test_walk_visits_each_module_once_in_the_order_of_modules():
    m = small()
    shared = nn.Linear(3, 3)
    m.a, m.b = shared, shared
    assert walk_modules(m) == list(m.modules())


def test_identity_changes_with_each_kind_of_replacement():
    m = small()
    base = tensor_identity(walk_modules(m))
    assert tensor_identity(walk_modules(m)) == base                       # stable
    blk = m.transformer.h[1]
    with torch.no_grad():
        blk.mlp.c_fc.weight.mul_(2)                                       # values in place: same tensors
    assert tensor_identity(walk_modules(m)) == base
    blk.mlp.c_fc.weight.data = blk.mlp.c_fc.weight.data.clone()          # new storage
    assert tensor_identity(walk_modules(m)) != base
    base = tensor_identity(walk_modules(m))
    blk.ln_1.weight = nn.Parameter(blk.ln_1.weight.detach().clone())      # new parameter
    assert tensor_identity(walk_modules(m)) != base
    base = tensor_identity(walk_modules(m))
    blk.attn.c_proj = nn.Linear(32, 32)                                   # new module
    assert tensor_identity(walk_modules(m)) != base
    base = tensor_identity(walk_modules(m))
    m.half()                                                              # dtype
    assert tensor_identity(walk_modules(m)) != base


def test_skip_leaves_the_caches_out():
    m = small()
    m.setup_cache(1, 8, dtype=torch.float32)
    base = tensor_identity(walk_modules(m), skip=(KVCache,))
    with_cache = tensor_identity(walk_modules(m))
    m.setup_cache(2, 8, dtype=torch.float32)                              # new caches
    assert tensor_identity(walk_modules(m), skip=(KVCache,)) == base
    assert tensor_identity(walk_modules(m)) != with_cache
