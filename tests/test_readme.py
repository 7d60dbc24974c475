"""The README's Python blocks run as written, in order, in one fresh interpreter.

Paths under ``/tmp/`` in the README are redirected to a temporary directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_sections_users_look_for() -> None:
    text = README.read_text(encoding="utf-8")
    for heading in ("## Two commands", "## Quick start (Python)", "## Quick start (command line)",
                    "## Backends and devices", "## The store on disk", "## The memory cap",
                    "## Search", "## Benchmarks"):
        assert heading in text
    assert "python -m pytest -q" in text and "embtools demo" in text
    assert "BENCHMARK_FIGURES" not in text


def test_readme_python_blocks_run(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 6
    script = "\n\n".join(blocks).replace("/tmp/", str(tmp_path) + "/")
    (tmp_path / "readme.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBTOOLS_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MemoryLimitError" not in proc.stderr
    assert "max_memory_gb" in proc.stdout or "MB" in proc.stdout   # the cap's message was printed
