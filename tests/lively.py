"""Test models whose greedy output depends on position and cache (shared by the engine tests)."""


def lively(m, scale):
    """A random tied GPT-2 greedily repeats its last token (wte dominates the residual stream),
    which would hide position and cache bugs: scale the residual projections so the blocks decide
    the next token, and give the biases some values."""
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            p.mul_(scale)
        elif name.endswith(("attn.bias", "fc.bias", "proj.bias")):
            p.normal_(0, 0.02)
