"""The benchmark's own tools work: the C load generator counts every delivery
(its self-test), and bench/compare.py drives real gochan processes over HTTP
and through a real NATS server end to end. Nothing here is timed: the runs
are tiny and only their counts are checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
            pytest.fail(f"{binary} is required here (GOCHAN_REQUIRE_BROKERS=1)")
        pytest.skip(f"{binary} is not installed")


def test_load_generator_counts_every_delivery_exactly_once() -> None:
    need("cc")
    run = subprocess.run(
        [sys.executable, str(BENCH / "loadgen" / "selftest.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_compare_runs_gochan_over_http_and_nats(tmp_path: Path) -> None:
    need("cc")
    need("taskset")
    need("nats-server")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            "--servers",
            "gochan,gochan-nats",
            "--connections",
            "200",
            "--rates",
            "50,200",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--drain",
            "3",
            "--refine",
            "0",
            "--quiet-wait",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    for name in ("gochan", "gochan-nats"):
        server = report["servers"][name]
        assert server["ok"] and server["error"] is None, server["error"]
        assert server["connect"]["ready"] == 200
        steps = server["steps"]
        assert [s["rate"] for s in steps] == [50, 200]
        for step in steps:
            # 200 connections x 10 of 1,000 topics: 2 subscribers per topic.
            assert step["expected"] == 2 * step["published"] > 0
            assert step["received"] == step["expected"], step
            assert step["disconnects"] == 0 and step["pub_errors"] == 0
    assert report["servers"]["gochan"]["steps"][0]["pub_non2xx"] == 0
    assert "broker_cpu_share" in report["servers"]["gochan-nats"]["steps"][0]
    assert "gochan-nats" in run.stdout and "max sustained deliveries/s" in run.stdout
