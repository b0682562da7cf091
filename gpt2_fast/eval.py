"""`gpt2-fast eval`: perplexity on text (sliding window), LAMBADA last-word accuracy, and a small
zero-shot task harness whose tasks are data files.

Perplexity follows the stride method of HF's "Perplexity of fixed-length models" guide: windows
of max_length tokens start every `stride` tokens, and each window scores only the tokens that
the previous window did not, so every token is predicted once with at least
max_length - stride tokens of context. Unlike the guide's average of per-window means, the
result is the exact exp(total NLL / tokens scored). The text is preceded by <|endoftext|>, so
every token of the text is scored and bits per byte = total NLL / ln 2 / UTF-8 bytes of the text.

LAMBADA (Paperno et al. 2016), the GPT-2 paper's protocol: the context is the passage up to its
last word; a passage counts as right when greedy decoding produces every token of " last_word".
Its perplexity is exp(mean over passages of the last word's NLL), the convention of the
paper's tables and of lm-evaluation-harness.

Task harness: TASKS maps a name to a function(model, path, **options) -> metrics dict; each
reads its data file. Built in: "ppl" (a text file), "lambada" (.jsonl of {"text"}), "cloze"
(.jsonl of {"context", "target"}: greedy exact match + NLL of the target), and "choice" (.jsonl of
{"context", "choices", "label"}: the choice with the highest log-likelihood, optionally per
token). The paper's CBT, Winograd and the like become "choice" files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import parse_jsonl
from .tokenizer import EOT_TOKEN, get_tokenizer


def _device(model) -> torch.device:
    return model.transformer.wte.weight.device


def _check_window(model, max_length: Optional[int], stride: Optional[int]) -> tuple[int, int]:
    block = model.config.block_size
    max_length = block if max_length is None else max_length
    if not 1 < max_length <= block:
        raise ValueError(f"max_length must be in [2, block_size={block}], got {max_length}")
    stride = max_length // 2 if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    return max_length, stride


@torch.no_grad()
def token_nll(model, ids: Sequence[int], max_length: Optional[int] = None,
              stride: Optional[int] = None, batch_size: int = 8) -> torch.Tensor:
    """NLL (nats, float64) of the tokens the sliding-window method scores: ids[1:] when
    stride < max_length (with stride == max_length the first token of each window is skipped,
    as in HF's recipe)."""
    max_length, stride = _check_window(model, max_length, stride)
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    # windows (begin, end, scored): each scores the last `scored` tokens it holds that no earlier
    # window scored; the first token of a window has no context in it and is never scored there
    windows, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + max_length, n)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            windows.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
        begin += stride
    device = _device(model)
    out = []
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        L = max(e - b for b, e, _ in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        for r, (b, e, _) in enumerate(group):
            x[r, :e - b] = ids[b:e]
        logits, _ = model(x.to(device))                                   # (G, L, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, (b, e, scored) in enumerate(group):
            pos = torch.arange(e - b - scored, e - b, device=device)      # scored positions in the window
            target = ids[b:e].to(device)[pos]
            out.append(-logp[r, pos - 1].gather(1, target[:, None])[:, 0].double().cpu())
    return torch.cat(out)


def perplexity(model, text: str, max_length: Optional[int] = None, stride: Optional[int] = None,
               batch_size: int = 8, prepend_eot: bool = True) -> dict:
    """{'ppl', 'loss' (nats/token), 'bpb' (bits per UTF-8 byte), 'tokens', 'bytes'} of text."""
    if not isinstance(text, str) or not text:
        raise ValueError("perplexity needs a non-empty str")
    tok = get_tokenizer()
    ids = tok.encode(text, allow_special=False)
    if prepend_eot:
        ids = [EOT_TOKEN] + ids
    nll = token_nll(model, ids, max_length, stride, batch_size)
    if nll.numel() != len(ids) - 1:
        raise ValueError(f"stride must be < max_length so that every token is scored (got stride "
                         f"{stride}, max_length {max_length})")
    total = float(nll.sum())
    loss = total / nll.numel()
    scored_bytes = len(text.encode("utf-8")) if prepend_eot else len(tok.decode_bytes(ids[1:]))
    return {"ppl": math.exp(loss), "loss": loss, "bpb": total / math.log(2) / scored_bytes,
            "tokens": int(nll.numel()), "bytes": scored_bytes}


# ---------------------------------------------------------------------------------------------
# continuation scoring (LAMBADA, cloze, multiple choice)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def score_continuations(model, pairs: Sequence[tuple[list[int], list[int]]],
                        batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (NLL of the continuation, whether greedy
    decoding reproduces all of it). Contexts are cut from the left to fit block_size."""
    block = model.config.block_size
    device = _device(model)
    results = []
    for i in range(0, len(pairs), batch_size):
        group = []
        for ctx, cont in pairs[i:i + batch_size]:
            if not cont:
                raise ValueError("a continuation must have at least one token")
            if len(cont) >= block:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit block_size {block}")
            ctx = (ctx or [EOT_TOKEN])[-(block - len(cont)):]
            group.append((ctx, cont))
        L = max(len(c) + len(t) - 1 for c, t in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        for r, (c, t) in enumerate(group):
            seq = (c + t)[:-1]
            x[r, :len(seq)] = torch.tensor(seq)
        logits, _ = model(x.to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, (c, t) in enumerate(group):
            pos = torch.arange(len(c) - 1, len(c) - 1 + len(t), device=device)
            target = torch.tensor(t, device=device)
            lp = logp[r, pos]                                              # (len(t), V)
            nll = -float(lp.gather(1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            results.append((nll, greedy))
    return results


def _read_jsonl(path: str, fields: Sequence[str]) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, obj in parse_jsonl(f, path):
            missing = [k for k in fields if k not in obj]
            if missing:
                raise ValueError(f"{path}:{lineno}: expected fields {list(fields)}, missing {missing}")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def split_last_word(text: str) -> tuple[str, str]:
    """LAMBADA: (context, ' last_word'); the target is the final whitespace-separated word."""
    text = text.strip()
    if " " not in text:
        raise ValueError(f"a LAMBADA passage needs a context and a last word, got {text[:60]!r}")
    ctx, word = text.rsplit(" ", 1)
    return ctx, " " + word


def lambada(model, path: str, batch_size: int = 16, limit: Optional[int] = None) -> dict:
    """Last-word accuracy and perplexity on a LAMBADA-style .jsonl of {"text": passage}."""
    rows = _read_jsonl(path, ["text"])[:limit]
    tok = get_tokenizer()
    pairs = []
    for r in rows:
        ctx, word = split_last_word(r["text"])
        pairs.append((tok.encode(ctx, allow_special=False), tok.encode(word, allow_special=False)))
    res = score_continuations(model, pairs, batch_size)
    nll = sum(n for n, _ in res) / len(res)
    return {"acc": sum(g for _, g in res) / len(res), "ppl": math.exp(nll), "loss": nll, "n": len(res)}


def cloze(model, path: str, batch_size: int = 16, limit: Optional[int] = None) -> dict:
    """Greedy exact match and perplexity of {"context", "target"} pairs (target as written,
    so include its leading space)."""
    rows = _read_jsonl(path, ["context", "target"])[:limit]
    tok = get_tokenizer()
    pairs = [(tok.encode(r["context"], allow_special=False), tok.encode(r["target"], allow_special=False))
             for r in rows]
    res = score_continuations(model, pairs, batch_size)
    nll = sum(n for n, _ in res) / len(res)
    return {"acc": sum(g for _, g in res) / len(res), "ppl": math.exp(nll), "loss": nll, "n": len(res)}


def choice(model, path: str, batch_size: int = 16, limit: Optional[int] = None,
           normalize: bool = False) -> dict:
    """Multiple choice: {"context", "choices": [str...], "label": int}; the prediction is the
    choice of lowest NLL (per token when normalize)."""
    rows = _read_jsonl(path, ["context", "choices", "label"])[:limit]
    tok = get_tokenizer()
    pairs, owners = [], []
    for i, r in enumerate(rows):
        if not isinstance(r["choices"], list) or not 0 <= int(r["label"]) < len(r["choices"]):
            raise ValueError(f"{path}: example {i}: 'label' must index 'choices', got {r['label']!r}")
        ctx = tok.encode(r["context"], allow_special=False)
        for c in r["choices"]:
            pairs.append((ctx, tok.encode(c, allow_special=False)))
            owners.append(i)
    res = score_continuations(model, pairs, batch_size)
    scores: list[list[float]] = [[] for _ in rows]
    for (ctx, cont), (nll, _), i in zip(pairs, res, owners):
        scores[i].append(nll / len(cont) if normalize else nll)
    correct = sum(min(range(len(s)), key=s.__getitem__) == int(r["label"]) for s, r in zip(scores, rows))
    return {"acc": correct / len(rows), "n": len(rows)}


# ---------------------------------------------------------------------------------------------
# de-tokenizers: the GPT-2 paper scores WikiText and PTB after undoing their tokenization
# ("invertible de-tokenizers", section 3.1); these follow the rules lm-evaluation-harness uses.
# ---------------------------------------------------------------------------------------------

def detokenize_wikitext(text: str) -> str:
    """WikiText's ' @-@ ', ' , ', ' ( x ) ', '= = Heading = =' ... back to ordinary text."""
    import re
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                 (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def detokenize_ptb(text: str) -> str:
    """Penn Treebank (Mikolov's version): contractions and punctuation re-attached; '<unk>'
    and 'N' (a number) are left as the paper's evaluation leaves them."""
    s = text
    for a, b in ((" 's", "'s"), (" n't", "n't"), (" 're", "'re"), (" 've", "'ve"), (" 'll", "'ll"),
                 (" 'd", "'d"), (" 'm", "'m"), (" , ", ", "), (" . ", ". "), (" \n", "\n"),
                 ("$ ", "$"), (" %", "%"), (" & ", "&"), (" ;", ";"), (" :", ":")):
        s = s.replace(a, b)
    return s


DETOKENIZERS = {"none": lambda s: s, "wikitext": detokenize_wikitext, "ptb": detokenize_ptb}


def ppl_file(model, path: str, max_length: Optional[int] = None, stride: Optional[int] = None,
             batch_size: int = 8, limit: Optional[int] = None, detok: str = "none") -> dict:
    from .data import _read_text
    if detok not in DETOKENIZERS:
        raise ValueError(f"detok must be one of {sorted(DETOKENIZERS)}, got {detok!r}")
    text = DETOKENIZERS[detok](_read_text(path))
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return perplexity(model, text[:limit] if limit else text, max_length, stride, batch_size)


TASKS: dict[str, Callable[..., dict]] = {"ppl": ppl_file, "lambada": lambada, "cloze": cloze, "choice": choice}


def run_task(model, name: str, path: str, **options) -> dict:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](model, path, **options)


# ---------------------------------------------------------------------------------------------
# `gpt2-fast eval`
# ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli_generate import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--ppl", action="append", default=[], metavar="FILE",
                   help="perplexity of a text file (.txt or .gz); repeatable")
    p.add_argument("--lambada", action="append", default=[], metavar="JSONL",
                   help='LAMBADA-style .jsonl of {"text"}: last-word accuracy and perplexity')
    p.add_argument("--task", action="append", default=[], metavar="NAME:FILE",
                   help=f"a harness task on a data file, e.g. choice:cbt_cn.jsonl ({', '.join(TASKS)})")
    p.add_argument("--max-length", type=int, default=None, help="perplexity window (default block_size)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default max_length/2)")
    p.add_argument("--detok", default="none", choices=["none", "wikitext", "ptb"],
                   help="de-tokenize --ppl text first, as the GPT-2 paper does (docs/EVAL.md)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N examples (or characters for ppl)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args) -> int:
    from .cli_generate import load_model
    jobs = [("ppl", f) for f in args.ppl] + [("lambada", f) for f in args.lambada]
    for t in args.task:
        if ":" not in t:
            raise ValueError(f"--task expects NAME:FILE, got {t!r}")
        jobs.append(tuple(t.split(":", 1)))
    if not jobs:
        raise ValueError("nothing to evaluate: give --ppl FILE, --lambada FILE or --task NAME:FILE")
    model = load_model(args)
    results = []
    for name, path in jobs:
        opts = {"batch_size": args.batch_size, "limit": args.limit}
        if name == "ppl":
            opts.update(max_length=args.max_length, stride=args.stride, detok=args.detok)
        r = run_task(model, name, path, **opts)
        results.append({"task": name, "file": path, **r})
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        print(f"{name:8s} {path}: {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
