"""The wheel `pip wheel .` builds: it carries csrc/ inside the package (so GPT2_FAST_JIT=1 can
compile the extension from an installed wheel), and says loudly when the extension was skipped."""
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_copy(dst):
    """The files a build reads, copied (the shared work tree is never built in)."""
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(os.path.join(ROOT, f), dst)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build", "_build_info.json")
    for d in ("gpt2_fast", "kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dst, d), ignore=ignore)


@pytest.mark.slow
def test_wheel_ships_the_sources_and_flags_the_skipped_extension(tmp_path):
    src, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    src.mkdir()
    _source_copy(str(src))
    env = dict(os.environ, GPT2_FAST_SKIP_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(dist), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = glob.glob(str(dist / "*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    csrc = os.path.join(ROOT, "csrc")
    wanted = {"gpt2_fast/csrc/" + os.path.relpath(os.path.join(d, f), csrc).replace(os.sep, "/")
              for d, _, fs in os.walk(csrc) for f in fs if f.endswith((".cpp", ".cu", ".h", ".cuh", ".inc"))}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert {"gpt2_fast/kernels/__init__.py", "gpt2_fast/data/gpt2.tiktoken", "gpt2_fast/build_ext.py"} <= names
    assert not any(n.endswith(".so") for n in names)
    info = json.loads(zipfile.ZipFile(whl).read("gpt2_fast/_build_info.json"))
    assert info == {"extension": "skipped", "reason": "GPT2_FAST_SKIP_EXT=1"}
    # installed (unpacked) where no csrc/ sits beside the package: the JIT path finds the copy inside
    zipfile.ZipFile(whl).extractall(site)
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2_FAST_SKIP_EXT", "GPT2_FAST_JIT")}
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
            "getattr(f, '__module__', '')]\n"  # this checkout's editable install would serve gpt2_fast._C
            "from gpt2_fast.cli import main; raise SystemExit(main(['info']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path), env=dict(env, PYTHONPATH=str(site), GPT2_FAST_JIT="0"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WARNING: the compiled extension gpt2_fast._C is NOT available" in r.stdout
    assert "built without it: GPT2_FAST_SKIP_EXT=1" in r.stdout
    assert f"JIT sources: {site / 'gpt2_fast' / 'csrc'}" in r.stdout
