"""The README's embedding example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_embedding_example_runs() -> None:
    text = README.read_text()
    match = re.search(r"<!-- embed-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the embedding example is missing from the README"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("listening on ")
    assert lines[1] == "2 ['news', 'weather']"
    assert re.fullmatch(r"published [0-9a-f]{8}-1", lines[2])
