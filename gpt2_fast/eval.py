"""`gpt2-fast eval`: perplexity on text (sliding window), validation loss on prepared shards,
LAMBADA last-word accuracy, HellaSwag (gpt2_fast/hellaswag.py), and a small zero-shot task
harness whose tasks are data files.

Perplexity follows the stride method of HF's "Perplexity of fixed-length models" guide: windows
of max_length tokens start every `stride` tokens, and each window scores only the tokens that
the previous window did not, so every token is predicted once with at least
max_length - stride tokens of context. Unlike the guide's average of per-window means, the
result is the exact exp(total NLL / tokens scored). The text is preceded by <|endoftext|>, so
every token of the text is scored and bits per byte = total NLL / ln 2 / UTF-8 bytes of the text.

Validation loss (--val-data): the val shards of a `gpt2-fast prepare` folder as one stream, cut
into non-overlapping windows of max_length + 1 tokens (the last one shorter), every token after
a window's first scored once with the context of its window; the mean NLL is the loss a training
run's evaluation estimates from a sample of those windows.

LAMBADA (Paperno et al. 2016), the GPT-2 paper's protocol: the context is the passage up to its
last word (split at the last run of whitespace: a space, newline or tab); a passage counts as right when greedy decoding produces every token of " last_word".
Its perplexity is exp(mean over passages of the last word's NLL), the convention of the
paper's tables and of lm-evaluation-harness.

Task harness: TASKS maps a name to a function(model, path, **options) -> metrics dict; each
reads its data file. Built in: "ppl" (a text file), "lambada" (.jsonl of {"text"}), "cloze"
(.jsonl of {"context", "target"}: greedy exact match + NLL of the target), and "choice" (.jsonl of
{"context", "choices", "label"}: the choice with the highest log-likelihood, in total ("sum"),
per token ("token") or per UTF-8 byte ("byte"), --choice-norm). The paper's CBT, Winograd and
the like become "choice" files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import parse_jsonl
from .tokenizer import EOT_TOKEN, get_tokenizer


def _device(model) -> torch.device:
    return model.transformer.wte.weight.device


def progress_bar(total: int, desc: str, enabled: Optional[bool]):
    """A tqdm bar on stderr; enabled None: only when stderr is a terminal."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if enabled is False:
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, disable=None if enabled is None else False,
                leave=False)


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
              stride: Optional[int] = None, batch_size: int = 8,
              progress: Optional[bool] = False) -> torch.Tensor:
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
    return _score_windows(model, ids, windows, batch_size, progress, "perplexity")


def _score_windows(model, ids: torch.Tensor, windows: list[tuple[int, int, int]], batch_size: int,
                   progress: Optional[bool], desc: str) -> torch.Tensor:
    """NLL of the last `scored` tokens of each window (begin, end, scored) of ids, concatenated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(model)
    out = []
    bar = progress_bar(len(windows), desc, progress)
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
        bar.update(len(group))
    bar.close()
    return torch.cat(out)


def perplexity(model, text: str, max_length: Optional[int] = None, stride: Optional[int] = None,
               batch_size: int = 8, prepend_eot: bool = True, progress: Optional[bool] = False) -> dict:
    """{'ppl', 'loss' (nats/token), 'bpb' (bits per UTF-8 byte), 'tokens', 'bytes'} of text."""
    if not isinstance(text, str) or not text:
        raise ValueError("perplexity needs a non-empty str")
    tok = get_tokenizer()
    ids = tok.encode(text, allow_special=False)
    if prepend_eot:
        ids = [EOT_TOKEN] + ids
    nll = token_nll(model, ids, max_length, stride, batch_size, progress)
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
def score_continuations(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                        progress: Optional[bool] = False, desc: str = "scoring") -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (NLL of the continuation, whether greedy
    decoding reproduces all of it). Contexts are cut from the left to fit block_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    block = model.config.block_size
    device = _device(model)
    results = []
    bar = progress_bar(len(pairs), desc, progress)
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
        bar.update(len(group))
    bar.close()
    return results


def read_jsonl(path: str, fields: Sequence[str]) -> list[dict]:
    """The objects of a .jsonl file, each checked to hold `fields`; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        lines = _lines(f, path)
        for lineno, obj in parse_jsonl(lines, path):
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with fields {list(fields)}")
            missing = [k for k in fields if k not in obj]
            if missing:
                raise ValueError(f"{path}:{lineno}: expected fields {list(fields)}, missing {missing}")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


_read_jsonl = read_jsonl


def _lines(f, path: str) -> Iterable[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None


def split_last_word(text: str) -> tuple[str, str]:
    """LAMBADA: (context, ' last_word'): the target is the final word, split off at the last run
    of whitespace (space, newline, tab ...); the word is scored with one leading space, as GPT-2
    reads a word that follows others."""
    parts = text.strip().rsplit(None, 1)
    if len(parts) < 2:
        raise ValueError(f"a LAMBADA passage needs a context and a last word, got {text[:60]!r}")
    return parts[0], " " + parts[1]


def lambada(model, path: str, batch_size: int = 16, limit: Optional[int] = None,
            progress: Optional[bool] = False) -> dict:
    """Last-word accuracy and perplexity on a LAMBADA-style .jsonl of {"text": passage}."""
    rows = _read_jsonl(path, ["text"])[:limit]
    tok = get_tokenizer()
    pairs = []
    for r in rows:
        ctx, word = split_last_word(r["text"])
        pairs.append((tok.encode(ctx, allow_special=False), tok.encode(word, allow_special=False)))
    res = score_continuations(model, pairs, batch_size, progress, "lambada")
    nll = sum(n for n, _ in res) / len(res)
    return {"acc": sum(g for _, g in res) / len(res), "ppl": math.exp(nll), "loss": nll, "n": len(res)}


def cloze(model, path: str, batch_size: int = 16, limit: Optional[int] = None,
          progress: Optional[bool] = False) -> dict:
    """Greedy exact match and perplexity of {"context", "target"} pairs (target as written,
    so include its leading space)."""
    rows = _read_jsonl(path, ["context", "target"])[:limit]
    tok = get_tokenizer()
    pairs = [(tok.encode(r["context"], allow_special=False), tok.encode(r["target"], allow_special=False))
             for r in rows]
    res = score_continuations(model, pairs, batch_size, progress, "cloze")
    nll = sum(n for n, _ in res) / len(res)
    return {"acc": sum(g for _, g in res) / len(res), "ppl": math.exp(nll), "loss": nll, "n": len(res)}


CHOICE_NORMS = ("sum", "token", "byte")


def choice(model, path: str, batch_size: int = 16, limit: Optional[int] = None, norm: str = "sum",
           progress: Optional[bool] = False) -> dict:
    """Multiple choice: {"context", "choices": [str...], "label": int}; the prediction is the
    choice of lowest NLL: in total (norm "sum"), per token ("token") or per UTF-8 byte ("byte")."""
    if norm not in CHOICE_NORMS:
        raise ValueError(f"norm must be one of {CHOICE_NORMS}, got {norm!r}")
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
    res = score_continuations(model, pairs, batch_size, progress, "choice")
    scores: list[list[float]] = [[] for _ in rows]
    for (ctx, cont), (nll, _), i in zip(pairs, res, owners):
        size = {"sum": 1, "token": len(cont), "byte": len(tok.decode_bytes(cont))}[norm]
        scores[i].append(nll / size)
    correct = sum(min(range(len(s)), key=s.__getitem__) == int(r["label"]) for s, r in zip(scores, rows))
    return {"acc": correct / len(rows), "n": len(rows), "norm": norm}


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
             batch_size: int = 8, limit: Optional[int] = None, detok: str = "none",
             progress: Optional[bool] = False) -> dict:
    from .data_text import read_text
    if detok not in DETOKENIZERS:
        raise ValueError(f"detok must be one of {sorted(DETOKENIZERS)}, got {detok!r}")
    text = DETOKENIZERS[detok](read_text(path))
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return perplexity(model, text[:limit] if limit else text, max_length, stride, batch_size, progress=progress)


@torch.no_grad()
def val_loss(model, data: str, max_length: Optional[int] = None, batch_size: int = 8,
             limit: Optional[int] = None, progress: Optional[bool] = False) -> dict:
    """{'loss', 'ppl', 'tokens', 'shards'} on the val split of a prepared folder (or shard glob).

    The split is one stream cut as training cuts it (TokenLoader, sequential): windows of T+1
    tokens starting every T (T = max_length, default block_size), x = window[:-1] predicting
    y = window[1:]; the tail after the last full window is one shorter window, so every token
    after the first is scored exactly once. limit: score only the first `limit` tokens."""
    from .data import read_shard, shard_paths
    T, _ = _check_window(model, max_length, None)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = shard_paths(data, "val")
    ids = torch.from_numpy(np.concatenate([read_shard(p) for p in paths]).astype(np.int64))
    if limit:
        ids = ids[:limit + 1]
    n = ids.numel()
    if n < 2:
        raise ValueError(f"the val split of {data} has {n} tokens; need at least 2")
    starts = list(range(0, n - 1, T))
    device = _device(model)
    total, count = 0.0, 0
    bar = progress_bar(len(starts), "val", progress)
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        full = [b for b in group if b + T + 1 <= n]
        rows = [ids[b:b + T + 1] for b in full] + [ids[b:] for b in group if b + T + 1 > n]
        for chunk in ([torch.stack(rows[:len(full)])] if full else []) + [r[None] for r in rows[len(full):]]:
            x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
            logits, _ = model(x)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total += float(nll)
            count += y.numel()
        bar.update(len(group))
    bar.close()
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "shards": len(paths)}


TASKS: dict[str, Callable[..., dict]] = {"ppl": ppl_file, "lambada": lambada, "cloze": cloze, "choice": choice}


def run_task(model, name: str, path: str, **options) -> dict:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](model, path, **options)


# ---------------------------------------------------------------------------------------------
# `gpt2-fast eval`
# ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli_generate import add_model_arguments, positive_int
    add_model_arguments(p)
    what = p.add_argument_group("what to evaluate (each repeatable)")
    what.add_argument("--ppl", action="append", default=[], metavar="FILE",
                      help="perplexity and bits per byte of a text file (.txt or .gz)")
    what.add_argument("--val-data", action="append", default=[], metavar="DIR",
                      help="a `gpt2-fast prepare` folder: loss and perplexity on its val shards")
    what.add_argument("--lambada", action="append", default=[], metavar="JSONL",
                      help='LAMBADA-style .jsonl of {"text"}: last-word accuracy and perplexity')
    what.add_argument("--hellaswag", action="append", default=[], metavar="JSONL",
                      help="HellaSwag .jsonl (ctx, endings, label): acc, acc_norm (per token, as llm.c and "
                           "nanoGPT) and acc_bytes (per byte, as lm-evaluation-harness)")
    what.add_argument("--task", action="append", default=[], metavar="NAME:FILE",
                      help=f"a harness task on a data file, e.g. choice:cbt_cn.jsonl ({', '.join(TASKS)})")
    how = p.add_argument_group("how")
    how.add_argument("--choice-norm", default="sum", choices=CHOICE_NORMS,
                     help="choice tasks: rank choices by total NLL (sum), per token, or per byte")
    how.add_argument("--max-length", type=positive_int, default=None,
                     help="perplexity / val window (default block_size)")
    how.add_argument("--stride", type=positive_int, default=None, help="perplexity stride (default max_length/2)")
    how.add_argument("--detok", default="none", choices=sorted(DETOKENIZERS),
                     help="de-tokenize --ppl text first, as the GPT-2 paper does (docs/EVAL.md)")
    how.add_argument("--batch-size", type=positive_int, default=8)
    how.add_argument("--limit", type=positive_int, default=None,
                     help="first N examples (characters for --ppl, tokens for --val-data)")
    how.add_argument("--no-progress", action="store_true", help="no progress bars (shown on a terminal)")
    out = p.add_argument_group("output")
    out.add_argument("--out", "--json", dest="out", default=None, metavar="FILE.json",
                     help="also write the results to this JSON file")
    out.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _jobs(args) -> list[tuple[str, str]]:
    """(task, path) of every evaluation asked for, each input checked before the model loads."""
    from .data import shard_paths
    jobs = [("ppl", f) for f in args.ppl] + [("val", d) for d in args.val_data] + \
        [("lambada", f) for f in args.lambada] + [("hellaswag", f) for f in args.hellaswag]
    for t in args.task:
        name, sep, path = t.partition(":")
        if not sep or not path:
            raise ValueError(f"--task expects NAME:FILE, got {t!r}")
        if name not in TASKS:
            raise ValueError(f"--task {t}: unknown task {name!r}; expected one of {sorted(TASKS)}")
        jobs.append((name, path))
    if not jobs:
        raise ValueError("nothing to evaluate: give --ppl FILE, --val-data DIR, --lambada FILE, "
                         "--hellaswag FILE or --task NAME:FILE")
    for name, path in jobs:
        if name == "val":
            shard_paths(path, "val")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"--{name if name in ('ppl', 'lambada', 'hellaswag') else 'task'} "
                                    f"{path}: no such file")
    return jobs


def check_out_file(path: Optional[str], overwrite: bool, flag: str = "--out") -> None:
    """An output file we may write: not a folder, in an existing folder, new unless overwrite."""
    if path is None:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a folder; expected a file name such as {path.rstrip('/')}/results.json")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: the folder {parent} does not exist")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")


def _run_job(model, name: str, path: str, args, progress: Optional[bool]) -> dict:
    opts = {"batch_size": args.batch_size, "limit": args.limit, "progress": progress}
    if name == "ppl":
        opts.update(max_length=args.max_length, stride=args.stride, detok=args.detok)
    elif name == "choice":
        opts.update(norm=args.choice_norm)
    if name == "val":
        return val_loss(model, path, max_length=args.max_length, **opts)
    if name == "hellaswag":
        from .hellaswag import hellaswag
        return hellaswag(model, path, **opts)
    return run_task(model, name, path, **opts)


def run(args) -> int:
    from .atomic import atomic_write
    from .cli_generate import check_model_arguments, load_model
    jobs = _jobs(args)
    check_out_file(args.out, args.overwrite)
    check_model_arguments(args)
    model = load_model(args)
    progress = False if args.no_progress else None
    results = []
    for name, path in jobs:
        r = _run_job(model, name, path, args, progress)
        results.append({"task": name, "file": path, **r})
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        print(f"{name:9s} {path}: {shown}", flush=True)
    if args.out:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
        atomic_write(args.out, write)
    return 0
