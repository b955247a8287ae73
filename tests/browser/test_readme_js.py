"""The README's gochan.js example, run as written in headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from .conftest import ROOT, BrowserSession

PAGE = """<!doctype html>
<meta charset="utf-8"><title>README example</title><link rel="icon" href="data:,">
<script>
  // What the README's snippet leaves to the application.
  window.rendered = [];
  window.render = (data) => window.rendered.push(data);
  window.onSport = (data) => window.rendered.push("sport:" + data);
  window.refetchState = () => { window.refetched = true; };
</script>
<script type="module">
%s
window.readmeGc = gc;
</script>
"""


def readme_js() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-js[^>]*-->\s*```js\n(.*?)```", text, re.S)
    assert match, "the gochan.js example is missing from the README"
    return match.group(1)


def test_readme_example_receives_messages(
    browser: BrowserSession, gochan_server: Any, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE % readme_js())
    base, _ = gochan_server("--static-dir", str(site))
    browser.page.goto(f"{base}/")
    # One stream, both topics held (the two subscribe calls went out together).
    browser.wait_js("() => window.readmeGc && window.readmeGc.subscriptions.length === 2")
    assert sorted(browser.js("() => window.readmeGc.subscriptions")) == ["news", "sport"]
    for topic, data in (("news", "first"), ("sport", "goal")):
        r = httpx.post(f"{base}/publish", params={"topic": topic}, content=data, timeout=5)
        assert r.status_code == 200, r.text
    browser.wait_js("() => window.rendered.length >= 2")
    assert browser.js("() => window.rendered") == ["first", "sport:goal"]
    assert browser.js("() => window.__sources.length") == 1
    browser.assert_no_errors()
