"""The operator documentation says what the code does, and its commands and
configurations work: the help of every setting, docs/configuration.md and
docs/drivers.md against the code, the nginx configuration of
docs/production.md run with a real nginx in front of a real gochan, its
systemd unit verified, and every ``python -m gochan.server`` command line of
the docs accepted by ``--check-config``."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gochan.config import DEFAULT_HEARTBEAT_S, FLAG_HELP, Config
from gochan.drivers import DRIVERS, driver_class
from gochan.server import reference
from tests.hardening._proc import server_process
from tests.support import free_port, parse_frame

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
DRIVERS_MD = DOCS / "drivers.md"
PRODUCTION = DOCS / "production.md"

FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "driver_options"}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "SECURITY.md", *sorted(DOCS.glob("*.md"))]


def code_blocks(path: Path) -> Iterator[tuple[str, str, str]]:
    """(marker comment before it or '', language, text) of every fenced block."""
    text = path.read_text(encoding="utf-8")
    pattern = r"(?:<!-- ([\w-]+)[^>]*-->\s*)?^```(\w*)\n(.*?)^```"
    for match in re.finditer(pattern, text, re.S | re.M):
        yield match[1] or "", match[2], match[3]


def marked_block(path: Path, marker: str) -> str:
    found = [text for mark, _, text in code_blocks(path) if mark == marker]
    assert len(found) == 1, f"{path.name}: one block marked {marker!r} expected"
    return found[0]


def generated(path: Path, name: str) -> str:
    match = reference.block_pattern(name).search(path.read_text(encoding="utf-8"))
    assert match, f"{path.name}: generated block {name!r} is missing"
    return match[2].strip("\n") + "\n"


def test_links_between_the_docs_resolve() -> None:
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https://..., mailto:...
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.is_file(), f"{path.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
                slugs = {re.sub(r"[^\w -]", "", h).strip().lower() for h in headings}
                slugs = {slug.replace(" ", "-") for slug in slugs}
                assert anchor in slugs, f"{path.name}: no heading for {target}"


# -- help lines --------------------------------------------------------------


def default_forms(value: Any) -> list[str]:
    """How a help line may state the default ``value``."""
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, (int, float)):
        forms = [f"{value:g}"]
        for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
            if value and value % size == 0:
                forms.append(f"{value // size:g} {unit}")
        return forms
    if value in ("", []):
        return ["none"]
    if isinstance(value, list):
        return [",".join(value)]
    return [str(value)]


def test_every_setting_has_a_help_line_stating_its_default() -> None:
    for name, f in FIELDS.items():
        meaning, stated = reference.help_parts(name)  # ValueError without one
        assert meaning and stated, name
        if f.default is dataclasses.MISSING:
            continue  # a default computed at run time (max_connections)
        forms = default_forms(f.default)
        assert any(re.search(rf"(?<![\w.]){re.escape(form)}(?![\w])", stated) for form in forms), (
            f"{name}: help states default {stated!r}, the code's is {f.default!r}"
        )


def test_help_lines_name_only_settings() -> None:
    assert set(FLAG_HELP) <= set(FIELDS), set(FLAG_HELP) - set(FIELDS)


def test_every_setting_has_a_section_and_a_unit() -> None:
    named = {name for _, names in reference.SECTIONS for name in names}
    assert named <= set(FIELDS), named - set(FIELDS)
    assert set(FIELDS) <= named, f"not in reference.SECTIONS: {set(FIELDS) - named}"
    for name in FIELDS:
        assert reference.unit(name), f"{name}: no unit (reference.UNITS)"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gochan.server", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_cli_help_shows_every_flag_with_its_default_and_every_driver_option() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    packed = "".join(result.stdout.split())  # argparse wraps lines, at hyphens too
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        stated = "".join(reference.help_parts(name)[1].split())
        assert re.search(
            rf"{flag}[A-Z_]*(,--no-[a-z-]+)?[^-].*?\(default:?{re.escape(stated)}\)", packed
        ), name
    for name, (_, _, extra) in DRIVERS.items():
        assert f" {name} (pip install 'gochan[{extra}]')" in text or extra is None, name
        for param in inspect.signature(driver_class(name)).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                continue
            flag = f"--{name}-{param.name.replace('_', '-')}"
            assert re.search(rf"{flag}\b[^(]*\(default ", text), flag


# -- docs/configuration.md ---------------------------------------------------


def table_rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_configuration_reference_has_every_key_with_flag_and_variable() -> None:
    block = generated(CONFIGURATION, "settings")
    rows = {row[0].strip("`"): row for row in table_rows(block)}
    for name in FIELDS:
        assert name in rows, f"docs/configuration.md does not document {name}"
        flag = "--" + name.replace("_", "-")
        assert f"`{flag}`" in rows[name][1], name
        assert rows[name][2] == f"`GOCHAN_{name.upper()}`", name
        assert all(rows[name][3:]), f"{name}: default, unit and meaning must be given"
    assert set(rows) <= set(FIELDS), set(rows) - set(FIELDS)


def test_configuration_reference_is_generated_from_the_code() -> None:
    block = generated(CONFIGURATION, "settings")
    assert block == reference.config_table(), (
        "docs/configuration.md is stale: run `python -m gochan.server.reference`"
    )


def known_flags() -> set[str]:
    flags = {"--config", "--check-config", "--help"}
    for name in FIELDS:
        flags.update(reference.flag_of(name).split(", "))
    for driver in DRIVERS:
        for opt in reference.driver_options(driver):
            flag = f"--{driver}-{opt.name.replace('_', '-')}"
            flags.update((flag, f"--no-{flag[2:]}"))
    return flags


def test_docs_name_no_flag_or_key_that_does_not_exist() -> None:
    flags = known_flags()
    options = {opt.name for d in DRIVERS for opt in reference.driver_options(d)}
    for path in markdown_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            # gochan's reference, and gochan's command lines elsewhere (other
            # programs' flags, pip's or curl's, are not gochan's to check)
            if path != CONFIGURATION and not re.search(r"gochan\.server(?!\.reference)", line):
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", line):
                assert flag in flags, f"{path.name}: unknown gochan flag {flag} in {line!r}"
    # Every backquoted setting-like name of the reference is a key or an option.
    text = CONFIGURATION.read_text(encoding="utf-8")
    for name in re.findall(r"`([a-z]+(?:_[a-z0-9]+)+)`", text):
        assert name in FIELDS or name in options, (
            f"docs/configuration.md names {name!r}, which is no setting"
        )


# -- docs/drivers.md ---------------------------------------------------------


def test_driver_tables_match_the_constructors() -> None:
    for name in DRIVERS:
        block = generated(DRIVERS_MD, f"{name} options")
        params = [
            p
            for p in inspect.signature(driver_class(name)).parameters.values()
            if p.kind is not p.VAR_KEYWORD
        ]
        rows = table_rows(block)
        assert [row[0].strip("`") for row in rows] == [p.name for p in params], name
        for row, param in zip(rows, params, strict=True):
            shown = row[4].split("`")[1]
            expected = param.default
            if isinstance(expected, bool):
                assert shown == str(expected).lower(), (name, param.name)
            elif expected == "":
                assert shown == "''", (name, param.name)
            else:
                assert type(expected)(shown) == expected, (name, param.name, shown)
            assert row[5], f"{name}.{param.name} has no description in its docstring"
        if not params:
            assert block.strip() == "No options.", name
        assert block == reference.driver_table(name), (
            "docs/drivers.md is stale: run `python -m gochan.server.reference`"
        )


def test_drivers_doc_names_each_extra_as_pyproject_defines_it() -> None:
    extras = importlib.metadata.metadata("gochan").get_all("Provides-Extra") or []
    text = DRIVERS_MD.read_text(encoding="utf-8")
    for name, (_, _, extra) in DRIVERS.items():
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        if extra is None:
            assert "Built in." in section
            continue
        assert extra in extras, f"{name}: gochan has no extra {extra!r} (pyproject.toml)"
        assert f"pip install 'gochan[{extra}]'" in section, name
        assert "*Durability and replay*" in section, name


def test_regenerate_rewrites_a_stale_block(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for path in (CONFIGURATION, DRIVERS_MD):
        (docs / path.name).write_text(path.read_text())
    readme = DOCS.parent / "README.md"
    (tmp_path / "README.md").write_text(readme.read_text().replace("`url=nats:", "`uri=nats:"))
    stale = (docs / "drivers.md").read_text().replace("`--nats-url`", "`--nats-uri`")
    (docs / "drivers.md").write_text(stale)
    changed = reference.regenerate(docs)
    assert "drivers.md (nats options)" in changed and "../README.md (drivers)" in changed
    assert (docs / "drivers.md").read_text() == DRIVERS_MD.read_text()
    assert (tmp_path / "README.md").read_text() == readme.read_text()


# -- docs/security.md --------------------------------------------------------


def test_security_token_example_makes_a_token_gochan_can_check() -> None:
    import jwt

    namespace: dict[str, Any] = {}
    code = marked_block(DOCS / "security.md", "security-token")
    exec(compile(code, "docs/security.md", "exec"), namespace)
    token = namespace["gochan_token"]("42")
    claims = jwt.decode(token, namespace["GOCHAN_JWT_KEY"], algorithms=["HS256"])
    assert claims["sub"] == "42"
    assert claims["gochan"] == {"subscribe": ["user.42.*", "news"], "publish": []}
    assert claims["exp"] - claims["iat"] == 15 * 60
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another key, as long as a real one ought to be", algorithms=["HS256"])


# -- commands ----------------------------------------------------------------


def doc_files(tmp_path: Path) -> dict[str, Path]:
    """The files the docs show (a block whose first line is ``# /path``),
    written under tmp_path: /etc/gochan/gochan.yaml -> a real file."""
    files: dict[str, Path] = {}
    for path in markdown_files():
        for _, lang, text in code_blocks(path):
            first = text.splitlines()[0] if text else ""
            match = re.fullmatch(r"# (/\S+)( \(.*\))?", first)
            if match and lang in ("yaml", "sh"):
                target = tmp_path / match[1].strip("/").replace("/", "_")
                body = text
                if match[1].endswith(".env"):
                    body = re.sub(r"=<.*>", "=a-test-secret", text)
                target.write_text(body)
                files[match[1]] = target
    return files


def doc_commands() -> Iterator[tuple[str, str, list[str]]]:
    """(file, command, preceding export lines) of every shell line that
    runs ``python -m gochan.server``."""
    for path in markdown_files():
        for _, lang, text in code_blocks(path):
            if lang not in ("sh", "console", "bash", ""):
                continue
            exports: list[str] = []
            for line in text.replace("\\\n", " ").splitlines():
                line = line.removeprefix("$ ").strip()
                if line.startswith("export "):
                    exports.append(line)
                if re.search(r"python3? -m gochan\.server(\s|$)", line):
                    command = line.split("&&")[-1].strip()
                    yield path.name, command, list(exports)


def test_docs_have_the_commands_this_test_checks() -> None:
    commands = {(file, cmd) for file, cmd, _ in doc_commands()}
    files = {file for file, _ in commands}
    assert {"README.md", "configuration.md", "production.md"} <= files, files
    assert len(commands) >= 6, commands


def test_every_command_in_the_docs_is_accepted_by_check_config(tmp_path: Path) -> None:
    files = doc_files(tmp_path)
    assert "/etc/gochan/gochan.yaml" in files
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("GOCHAN_")}
    checked = 0
    for file, command, exports in doc_commands():
        for doc_path, real in files.items():
            command = command.replace(doc_path, str(real))
        script = "; ".join([*exports, f"{command} --check-config"])
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == 0, f"{file}: {command!r}: {result.stderr}{result.stdout}"
        assert re.search(r"^port +=", result.stdout, re.M), (file, command, result.stdout)
        checked += 1
    assert checked >= 5


# -- docs/production.md: systemd ---------------------------------------------


def unit_file() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in marked_block(PRODUCTION, "production-systemd").splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current[key] = value
    return sections


def test_systemd_unit_runs_a_valid_configuration(tmp_path: Path) -> None:
    import yaml

    unit = unit_file()
    service = unit["Service"]
    files = doc_files(tmp_path)
    config = yaml.safe_load(files["/etc/gochan/gochan.yaml"].read_text())
    # systemd waits longer than gochan's own grace period before SIGKILL
    assert float(service["TimeoutStopSec"]) > config["shutdown_grace"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["LimitNOFILE"]) >= 65536  # max_connections follows it
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(service["ExecStart"])
    assert argv[1:3] == ["-m", "gochan.server"], argv
    args = [str(files.get(a, a)) for a in argv[3:]]
    environment = dict(
        line.split("=", 1)
        for line in files[service["EnvironmentFile"]].read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert "GOCHAN_PUBLISH_KEY" in environment
    result = run_cli(*args, "--check-config", env=environment)
    assert result.returncode == 0, result.stderr
    assert "publish_key" in result.stdout and "a-test-secret" not in result.stdout

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the checks above are what can be checked without systemd
    text = marked_block(PRODUCTION, "production-systemd")
    text = text.replace(argv[0], sys.executable).replace(
        service["EnvironmentFile"], str(files[service["EnvironmentFile"]])
    )
    path = tmp_path / "gochan.service"
    path.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for problem in ("Unknown key", "Unknown section", "Failed to parse", "Invalid"):
        assert problem not in result.stderr, result.stderr


# -- docs/production.md: nginx -----------------------------------------------


def nginx_binary() -> str:
    """nginx (and openssl, for its certificate), or a skip; CI must have them."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )
    openssl = shutil.which("openssl")
    missing = [name for name, found in (("nginx", binary), ("openssl", openssl)) if found is None]
    if missing:
        if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
            pytest.fail(f"{' and '.join(missing)} required here (GOCHAN_REQUIRE_BROKERS=1)")
        pytest.skip(f"{' and '.join(missing)} not installed (Debian packages nginx, openssl)")
    assert binary is not None
    return binary


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    return int(match[1]) * units[match[2] or "s"]


def test_nginx_config_keeps_streams_open_and_unbuffered() -> None:
    conf = marked_block(PRODUCTION, "production-nginx")
    directives = dict(re.findall(r"^\s*(proxy_\w+) ([^;]+);", conf, re.M))
    assert directives["proxy_buffering"] == "off"
    assert directives["proxy_http_version"] == "1.1"
    assert seconds(directives["proxy_read_timeout"]) > 2 * DEFAULT_HEARTBEAT_S


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def nginx_conf(tmp_path: Path, nginx_port: int, gochan_port: int) -> Path:
    """The production.md block, made to run here: its ports and certificate
    paths replaced (each must be found), inside a minimal nginx.conf."""
    conf = marked_block(PRODUCTION, "production-nginx")
    cert, key = self_signed(tmp_path, "gochan.example.com")
    for old, new in (
        ("listen 443 ssl;", f"listen 127.0.0.1:{nginx_port} ssl;"),
        ("server 127.0.0.1:3000;", f"server 127.0.0.1:{gochan_port};"),
        ("/etc/ssl/certs/gochan.example.com.pem", str(cert)),
        ("/etc/ssl/private/gochan.example.com.key", str(key)),
    ):
        assert old in conf, f"docs/production.md's nginx block no longer has {old!r}"
        conf = conf.replace(old, new)
    temp = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    path = tmp_path / "nginx.conf"
    path.write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log info;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n    access_log off;\n{temp}{conf}}}\n"
    )
    return path


async def test_streams_through_the_documented_nginx_config(tmp_path: Path) -> None:
    binary = nginx_binary()
    nginx_port = free_port()
    key = "a-test-publish-key"
    with server_process(tmp_path, "--heartbeat", "1", "--publish-key", key) as gochan:
        conf = nginx_conf(tmp_path, nginx_port, gochan.port)
        check = subprocess.run(
            [binary, "-t", "-e", str(tmp_path / "error.log"), "-c", str(conf)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        nginx = subprocess.Popen(
            [binary, "-e", str(tmp_path / "error.log"), "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            await serve_through(nginx, nginx_port, key)
        finally:
            nginx.terminate()
            nginx.wait(10)
            assert nginx.stderr is not None
            nginx.stderr.close()


async def wait_listening(nginx: subprocess.Popen[bytes], port: int) -> None:
    for _ in range(200):
        assert nginx.poll() is None, "nginx exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError("nginx did not listen")


class Frames:
    """The SSE frames of a streamed httpx response (nginx re-frames the
    stream with chunked encoding, which httpx decodes)."""

    def __init__(self, response: httpx.Response) -> None:
        self.chunks = response.aiter_bytes()
        self.buffer = b""

    async def next(self, timeout: float = 5.0) -> bytes:
        while b"\n\n" not in self.buffer:
            self.buffer += await asyncio.wait_for(anext(self.chunks), timeout)
        frame, _, self.buffer = self.buffer.partition(b"\n\n")
        return frame + b"\n\n"

    async def event(self, timeout: float = 5.0) -> dict[str, str]:
        while (frame := await self.next(timeout)).startswith(b":"):
            pass
        return parse_frame(frame)


async def serve_through(nginx: subprocess.Popen[bytes], port: int, key: str) -> None:
    await wait_listening(nginx, port)
    host = f"gochan.example.com:{port}"
    origin = f"https://{host}"
    base = f"https://127.0.0.1:{port}"
    async with (
        httpx.AsyncClient(verify=False, headers={"Host": host}, timeout=10) as http,
        http.stream("GET", f"{base}/events?topic=news") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        frames = Frames(response)
        first = await frames.event()
        client_id = orjson.loads(first["data"])["config"]["client_id"]
        # A subscription update from the page's own origin: gochan sees the
        # browser's Host (port included), so the Origin matches it.
        r = await http.post(
            f"{base}/update_subscriptions",
            json={"client_id": client_id, "add": ["sport"]},
            headers={"Origin": origin},
        )
        assert r.status_code == 200, r.text
        assert r.json()["subscriptions"] == ["news", "sport"]
        # Through the proxy every peer is loopback: only the key publishes.
        r = await http.post(f"{base}/publish?topic=news", content=b"no key")
        assert r.status_code == 401, r.text
        r = await http.post(
            f"{base}/publish?topic=news",
            content=b"hello\nthrough nginx",
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        # Not buffered: the frame arrives while the stream stays open.
        event = await frames.event(timeout=5)
        assert event == {"event": "news", "id": r.json()["id"], "data": "hello\nthrough nginx"}
        # And the heartbeat (every second here) passes as it is.
        assert await frames.next(timeout=5) == b":\n\n"
