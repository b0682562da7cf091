"""The extension's source lists and flags, shared by setup.py and the JIT build in extension.py.

Filled in by the extension work (csrc/); returns [] while csrc/ has no sources.
"""
from __future__ import annotations


def extension_modules(root: str) -> list:
    return []
