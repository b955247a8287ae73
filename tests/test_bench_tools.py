"""The benchmark's own tools work: the C load generator counts every delivery
(its self-test), and bench/compare.py drives real gochan processes over HTTP
and through a real NATS server end to end, and bench/chart.py draws a result's
chart. Nothing here is timed: the runs are tiny and only their counts are checked."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    if importlib.util.find_spec("matplotlib") is not None:  # the chart, next to its JSON
        assert (tmp_path / "result.png").read_bytes()[:8] == PNG_SIGNATURE


def synthetic_report() -> dict[str, Any]:
    """A small compare.py report of the real schema (compare.ServerResult's summaries),
    made-up figures: 1,000 connections x 10 of 100 topics, 100 subscribers per topic."""
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    assert spec is not None and spec.loader is not None
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare  # its dataclasses look their module up
    try:
        spec.loader.exec_module(compare)
    finally:
        del sys.modules[spec.name]

    def step(rate: float, deliveries: float, p99_ms: float, sustained: bool) -> dict[str, Any]:
        return {
            "rate": rate,
            "target": rate * 2,
            "published": rate * 2,
            "publish_rate": rate,
            "expected": deliveries * 2,
            "received": deliveries * 2,
            "deliveries_per_s": deliveries,
            "delivery_ratio": 1.0 if sustained else 0.5,
            "latency_us": {
                "p50": p99_ms * 400,
                "p90": p99_ms * 800,
                "p99": p99_ms * 1000,
                "max": p99_ms * 1200,
            },
            "cpu_share": 0.3,
            "server_cpu_share": 0.9,
            "other_cpu_cores": 0.0,
            "disconnects": 0,
            "sustained": sustained,
        }

    shapes = {
        "gochan": [(100, 10_000, 1.3, True), (1000, 100_000, 1.5, True), (3e3, 29e4, 40, False)],
        "sse-starlette": [(100, 10_000, 27, True), (1000, 25_000, 7000, False)],
        "aiohttp-sse": [(100, 10_000, 3.3, True), (1000, 26_000, 7000, False)],
    }
    servers: dict[str, Any] = {}
    for name, steps in shapes.items():
        result = compare.ServerResult(
            name=name,
            ok=True,
            connect={"ready": 1000, "connect_time_s": 0.5},
            rss_before_kib=20_000,
            rss_after_kib=20_000 + {"gochan": 2800, "sse-starlette": 48_800}.get(name, 18_800),
            steps=[step(*s) for s in steps],
        )
        servers[name] = {
            "ok": True,
            "error": None,
            "version": "",
            "summary": result.summary(),
            "connect": result.connect,
            "rss_before_kib": result.rss_before_kib,
            "rss_after_kib": result.rss_after_kib,
            "rss_peak_kib": result.rss_after_kib,
            "steps": result.steps,
        }
    servers["gochan-nats"] = {"ok": False, "error": "nats-server is not installed", "steps": []}
    return {
        "started_at": "2026-12-02T01:30:00+00:00",
        "command": "python bench/compare.py --quick",
        "commit": "abc1234",
        "workload": {
            "name": "1000topics",
            "connections": 1000,
            "topics": 100,
            "per_conn_topics": 10,
            "subscribers_per_topic": 100.0,
            "duration_s": 2.0,
        },
        "machine": {"cpus": 2, "python": "3.11.7", "cpu_model": "Test CPU"},
        "servers": servers,
    }


def test_chart_draws_a_png_from_a_result(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="pip install -e '.[bench]' (or '.[test]')")
    from matplotlib.image import imread

    result = tmp_path / "compare-x.json"
    result.write_text(json.dumps(synthetic_report()))
    run = subprocess.run(
        [sys.executable, str(BENCH / "chart.py"), str(result)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    png = tmp_path / "compare-x.png"  # next to its JSON
    assert run.stdout.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # three panels of lines, bars and text, not an empty canvas
    pixels = imread(png)[:, :, :3]
    assert pixels.shape[0] > 400 and pixels.shape[1] > 1000
    # gochan's lines and bar are drawn in its own colour (#1f5fbf).
    gochan = (abs(pixels - [0x1F / 255, 0x5F / 255, 0xBF / 255]).max(axis=2) < 0.02).sum()
    assert gochan > 500


def test_chart_refuses_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"benchmarks": []}))
    run = subprocess.run(
        [sys.executable, str(BENCH / "chart.py"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "not a bench/compare.py result" in run.stderr
    assert not (tmp_path / "other.png").exists()
