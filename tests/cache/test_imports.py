"""The cache package stands alone: no torch at import, nothing from pipeline or train."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cache_imports_neither_torch_nor_upstream_packages():
    code = (
        "import sys, kvkd.cache\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('kvkd.pipeline', 'kvkd.train', 'kvkd.eval'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
