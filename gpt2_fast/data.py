"""Token data: `gpt2-fast prepare` writes token shards, TokenLoader streams (x, y) batches from them.

One module per job; this one gathers their public names (the package's data API):
    data_shards.py    the shard format (llm.c's), writing and reading a shard, finding the shards
                      of a corpus (prepared folder, llm.c folder, one file, glob), unigram baseline
    data_text.py      input text, streamed: UTF-8 chunks re-cut at safe points, .jsonl documents
    data_tokenize.py  documents -> ids on all cores, the train/val block split, the shard writer
    data_prepare.py   `gpt2-fast prepare`: a folder's shards replaced only after success
    data_loader.py    TokenLoader: memory-mapped (x, y) batches, DDP slices, a resumable position
The tuning constants (READ_CHUNK_BYTES, BATCH_CHARS, ...) are not repeated here: a module reads
its own, so set them there. gpt2_fast/data/ beside this file is package data (the tokenizer's
ranks, the bundled corpus), not a package: this module is what `gpt2_fast.data` imports.
"""
from __future__ import annotations

from .data_loader import LoaderState, TokenLoader
from .data_prepare import DEFAULT_CORPUS, add_arguments, prepare, run
from .data_shards import (HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, read_header, read_meta, read_shard,
                          shard_paths, unigram_baseline, write_shard)
from .data_text import (TEXT_SUFFIXES, file_sha256, iter_documents, iter_pieces, list_inputs, parse_jsonl,
                        read_text, safe_cut)
from .data_tokenize import SPLIT_BLOCK, encode_documents, tokenize_files

__all__ = ["DEFAULT_CORPUS", "HEADER_BYTES", "HEADER_INTS", "MAGIC", "SPLIT_BLOCK", "TEXT_SUFFIXES", "VERSION",
           "LoaderState", "TokenLoader", "add_arguments", "encode_documents", "file_sha256", "iter_documents",
           "iter_pieces", "list_inputs", "parse_jsonl", "prepare", "read_header", "read_meta", "read_shard",
           "read_text", "run", "safe_cut", "shard_paths", "tokenize_files", "unigram_baseline", "write_shard"]
