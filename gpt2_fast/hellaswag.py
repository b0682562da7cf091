"""HellaSwag (Zellers et al. 2019) zero-shot accuracy, scored the way llm.c / nanoGPT score it.

Input: the public jsonl (hellaswag_val.jsonl from rowanz/hellaswag), one example per line with
at least {"ctx": str, "endings": [4 str], "label": int}. As llm.c's dev/data/hellaswag.py does,
the context is encoded alone and each ending as " " + ending (GPT-2's tokenizer folds the space
into the first word), and only the ending's tokens are scored given the context:

  acc        the ending with the lowest total NLL (sum of its tokens' NLL)
  acc_norm   the ending with the lowest mean NLL per token (llm.c's and nanoGPT's "acc_norm")
  acc_bytes  the ending with the lowest NLL per UTF-8 byte of " " + ending
             (lm-evaluation-harness's acc_norm, which normalises by length in bytes/characters)

Ties go to the first ending, as torch.argmin does in llm.c. For GPT-2 124M on the 10,042
validation examples llm.c's script states acc 0.2859 and acc_norm 0.2955 (its figures; no
HellaSwag number was measured with gpt2_fast on this project's machines).
"""
from __future__ import annotations

from typing import Optional

from .eval import read_jsonl, score_continuations
from .tokenizer import get_tokenizer


def _examples(path: str, limit: Optional[int]) -> list[tuple[str, list[str], int]]:
    rows = read_jsonl(path, ["ctx", "endings", "label"])[:limit]
    out = []
    for i, r in enumerate(rows):
        endings, label = r["endings"], r["label"]
        if not isinstance(r["ctx"], str) or not isinstance(endings, list) or len(endings) < 2 \
                or not all(isinstance(e, str) and e for e in endings):
            raise ValueError(f"{path}: example {i + 1}: expected 'ctx' a string and 'endings' a list of "
                             f"at least 2 non-empty strings")
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < len(endings):
            raise ValueError(f"{path}: example {i + 1}: 'label' must index 'endings' "
                             f"(0..{len(endings) - 1}), got {r['label']!r}")
        out.append((r["ctx"], endings, label))
    return out


def hellaswag(model, path: str, batch_size: int = 16, limit: Optional[int] = None,
              progress: Optional[bool] = False) -> dict:
    """{'acc', 'acc_norm', 'acc_bytes', 'n'} of the HellaSwag-format .jsonl at path."""
    tok = get_tokenizer()
    examples = _examples(path, limit)
    pairs, owner, n_bytes = [], [], []
    for i, (ctx, endings, _) in enumerate(examples):
        ctx_ids = tok.encode(ctx, allow_special=False)
        for e in endings:
            pairs.append((ctx_ids, tok.encode(" " + e, allow_special=False)))
            owner.append(i)
            n_bytes.append(len((" " + e).encode("utf-8")))
    res = score_continuations(model, pairs, batch_size, progress=progress, desc="hellaswag")
    scores: list[dict] = [{"sum": [], "token": [], "byte": []} for _ in examples]
    for (_, cont), (nll, _), i, nb in zip(pairs, res, owner, n_bytes):
        scores[i]["sum"].append(nll)
        scores[i]["token"].append(nll / len(cont))
        scores[i]["byte"].append(nll / nb)

    def accuracy(kind: str) -> float:
        right = sum(_argmin(s[kind]) == label for s, (_, _, label) in zip(scores, examples))
        return right / len(examples)
    return {"acc": accuracy("sum"), "acc_norm": accuracy("token"), "acc_bytes": accuracy("byte"),
            "n": len(examples)}


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)  # the first of equal values
