"""`gpt2-fast demo` end to end with a few steps (slow: tokenizes the whole bundled Bible)."""
import math
import os

import pytest

from gpt2_fast.demo import demo, prepared


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = demo(str(tmp_path), steps=3, batch_size=2, device="cpu")
    assert out["step"] == 3 and os.path.exists(out["checkpoint"])
    assert math.isfinite(out["val_loss"]) and 5.0 < out["baseline_loss"] < 7.0
    assert prepared(str(tmp_path / "data"), __import__("gpt2_fast.data").data.DEFAULT_CORPUS)
    assert capsys.readouterr().out.startswith("And God said")
    assert os.path.exists(tmp_path / "train" / "loss.png")
