"""gochan.js's logic under Node's test runner (gochan_js.test.mjs): a
scripted EventSource and fetch drive the branches a real server rarely takes
(update failures, refused topics, 401 then a new client, backoff); and
gochan.d.ts type-checks under tsc --strict."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .conftest import ROOT, browser_unavailable

HERE = Path(__file__).resolve().parent
INTEROP = ROOT / "tests" / "interop"


def test_gochan_js_under_node(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        browser_unavailable("node is not installed")
    # An .mjs copy: Node loads it as an ES module whatever its version.
    copy = tmp_path / "gochan.mjs"
    shutil.copyfile(ROOT / "gochan" / "static" / "gochan.js", copy)
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", str(HERE / "gochan_js.test.mjs")],
        env={**os.environ, "GOCHAN_JS": str(copy), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fail 0" in result.stdout, result.stdout


def test_gochan_d_ts_type_checks() -> None:
    """tsc --strict compiles tests/interop/types_check.ts against gochan.d.ts:
    the documented usage type-checks and its @ts-expect-error misuses fail."""
    node = shutil.which("node")
    tsc = INTEROP / "node_modules" / "typescript" / "bin" / "tsc"
    if node is None or not tsc.is_file():
        browser_unavailable("typescript is missing: npm ci --prefix tests/interop")
    result = subprocess.run(
        [node, str(tsc), "-p", str(INTEROP / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
