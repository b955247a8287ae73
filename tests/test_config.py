"""One validated configuration: each bad value answered in one line, from
YAML, ``GOCHAN_*`` variables, flags and ``Config(...)`` alike; driver options
from any source in any combination; ``--check-config``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gochan.config import Config, load
from gochan.errors import ConfigurationError, MissingExtraError
from gochan.server.__main__ import main

BOOL = "true or false (yes/no, on/off, 1/0)"
NATS_URL = "nats://127.0.0.1:4333"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GOCHAN_* variable of the caller's reaches main()."""
    import os

    for key in list(os.environ):
        if key.startswith("GOCHAN_"):
            monkeypatch.delenv(key)
    yield


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gochan.yaml"
    path.write_text(text)
    return str(path)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main() as the command line runs it: exit code, stdout, stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def check_config(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, tuple[str, str]]:
    """--check-config's lines as {key: (value, source)}."""
    code, out, err = cli(capsys, "--check-config", *argv)
    assert (code, err) == (0, ""), err
    shown = {}
    for line in out.splitlines():
        key, _, rest = line.partition(" = ")
        value, _, source = rest.rpartition("  (")
        shown[key.strip()] = (value, source.rstrip(")"))
    return shown


# -- each bad value, from each source ----------------------------------------

CASES = [
    # (key, YAML text, env/flag string, the one line)
    ("port", '"abc"', "abc", "port: expected an integer 0..65535, got 'abc'"),
    ("port", "70000", "70000", "port: expected an integer 0..65535, got {v}"),
    (
        "log_level",
        "verbose",
        "verbose",
        "log_level: expected one of debug, info, warning, error, got 'verbose'",
    ),
    ("max_connections", "1.5", "1.5", "max_connections: expected an integer > 0, got {v}"),
    ("max_connections", "0", "0", "max_connections: expected an integer > 0, got {v}"),
    ("heartbeat", "-1", "-1", "heartbeat: expected a number > 0, got {v}"),
    ("heartbeat", ".nan", "nan", "heartbeat: expected a number > 0, got {v}"),
    ("history_size", "-1", "-1", "history_size: expected an integer >= 0, got {v}"),
    ("auto_create_clients", '"nope"', "nope", f"auto_create_clients: expected {BOOL}, got 'nope'"),
    ("events_path", "x", "x", "events_path: expected a path starting with '/', got 'x'"),
]  # fmt: skip


def yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(f"v: {text}")["v"]


@pytest.mark.parametrize(("key", "in_yaml", "as_string", "line"), CASES)
def test_yaml_errors_are_one_line(
    tmp_path: Path, key: str, in_yaml: str, as_string: str, line: str
) -> None:
    path = yaml_file(tmp_path, f"{key}: {in_yaml}\n")
    with pytest.raises(ConfigurationError) as caught:
        Config.from_sources(yaml_file=path, env={})
    assert str(caught.value) == line.format(v=repr(yaml_value(in_yaml)))


@pytest.mark.parametrize(("key", "in_yaml", "as_string", "line"), CASES)
def test_env_errors_are_one_line(key: str, in_yaml: str, as_string: str, line: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Config.from_sources(env={f"GOCHAN_{key.upper()}": as_string})
    assert str(caught.value) == line.format(v=repr(as_string))


@pytest.mark.parametrize(("key", "in_yaml", "as_string", "line"), CASES)
def test_flag_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], key: str, in_yaml: str, as_string: str, line: str
) -> None:
    flag = "--" + key.replace("_", "-")
    if key == "auto_create_clients":  # --auto-create-clients / --no-auto-create-clients
        code, out, err = cli(capsys, "--check-config", f"{flag}={as_string}")
        assert code == 2 and "ignored explicit argument 'nope'" in err  # argparse's answer
        return
    code, out, err = cli(capsys, "--check-config", f"{flag}={as_string}")
    assert (code, out, err) == (2, "", f"gochan: {line.format(v=repr(as_string))}\n")


def test_python_construction_validates_the_same_way() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^port: expected an integer 0\.\.65535, got 'abc'$"
    ):
        Config(port="abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^max_connections: expected an integer > 0, got 1\.5$"):
        Config(max_connections=1.5)  # type: ignore[arg-type]
    with pytest.raises(
        ConfigurationError,
        match="^" + re.escape(f"auto_create_clients: expected {BOOL}, got 'nope'"),
    ):
        Config(auto_create_clients="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^heartbeat: expected a number > 0, got True$"):
        Config(heartbeat=True)
    with pytest.raises(ConfigurationError) as caught:
        Config(publish_key=1234)  # type: ignore[arg-type]
    assert str(caught.value) == "publish_key: expected a string, got a value of type int"
    with pytest.raises(ConfigurationError) as caught:
        Config(driver="mqtt", driver_options={"password": 1234})
    assert str(caught.value) == "mqtt.password: expected a string, got a value of type int"
    with pytest.raises(ConfigurationError, match=r"^unknown configuration key 'prot'$"):
        Config.from_sources(env={}, flags={"prot": "1"})
    with pytest.raises(
        ConfigurationError, match=r"^publish_path: '/events' is already events_path$"
    ):
        Config(publish_path="/events")
    with pytest.raises(ConfigurationError, match=r"^port: expected"):
        Config().replace(port=-1)
    config = Config(cors_origins="http://a.test,http://b.test", client_ttl=5, log_level="INFO")  # type: ignore[arg-type]
    assert config.cors_origins == ["http://a.test", "http://b.test"]
    assert config.client_ttl == 5.0 and isinstance(config.client_ttl, float)
    assert config.log_level == "info"
    assert Config(max_connections_per_peer=0).peer_connection_limit == max(
        1, Config().max_connections // 10
    )
    assert Config(max_clients=50, max_clients_per_peer=0).peer_client_limit == 5
    assert Config(stream_send_buffer_bytes=0, allowed_hosts=["a.test"]).allowed_hosts == ["a.test"]


# -- values that are fine --------------------------------------------------------


def test_lists_are_yaml_lists_or_comma_strings(tmp_path: Path) -> None:
    text = "cors_origins: http://a.test,http://b.test\nallowed_hosts: [x.test, y.test]\n"
    config = Config.from_sources(yaml_file=yaml_file(tmp_path, text), env={})
    assert config.cors_origins == ["http://a.test", "http://b.test"]
    assert config.allowed_hosts == ["x.test", "y.test"]
    config = Config.from_sources(env={"GOCHAN_ALLOWED_HOSTS": " x.test , y.test ,"})
    assert config.allowed_hosts == ["x.test", "y.test"]
    with pytest.raises(ConfigurationError) as caught:
        Config.from_sources(yaml_file=yaml_file(tmp_path, "cors_origins: [1, 2]\n"), env={})
    assert str(caught.value) == (
        "cors_origins: expected a list of strings or a comma-separated string, got [1, 2]"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("false", False),
        ('"off"', False),
        ("yes", True),
        ('"on"', True),
        ("0", False),
    ],
)
def test_yaml_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    path = yaml_file(tmp_path, f"auto_create_clients: {text}\n")
    assert Config.from_sources(yaml_file=path, env={}).auto_create_clients is expected


def test_yaml_bool_must_be_a_boolean(tmp_path: Path) -> None:
    for text, shown in (("2", "2"), ("[true]", "[True]"), ("1.0", "1.0")):
        path = yaml_file(tmp_path, f"auto_create_clients: {text}\n")
        with pytest.raises(ConfigurationError) as caught:
            Config.from_sources(yaml_file=path, env={})
        assert str(caught.value) == f"auto_create_clients: expected {BOOL}, got {shown}"


def test_unknown_key_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Config.from_sources(yaml_file=yaml_file(tmp_path, "max_conections: 5\n"), env={})
    assert str(caught.value) == (
        "unknown configuration key 'max_conections' (did you mean 'max_connections'?)"
    )
    with pytest.raises(ConfigurationError) as caught:
        Config.from_sources(yaml_file=yaml_file(tmp_path, "port: [1\nhost: x\n"), env={})
    assert "\n" not in str(caught.value) and str(caught.value).startswith("cannot read config")
    with pytest.raises(ConfigurationError, match="top level must be a mapping"):
        Config.from_sources(yaml_file=yaml_file(tmp_path, "- 1\n"), env={})


def test_every_given_value_is_checked_even_when_overridden(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "port: abc\n")
    with pytest.raises(ConfigurationError, match=r"^port: expected"):
        Config.from_sources(yaml_file=path, env={}, flags={"port": "4000"})


# -- driver options from any source -------------------------------------------


def test_driver_in_yaml_url_by_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = yaml_file(tmp_path, "driver: nats\n")
    shown = check_config(capsys, "--config", path, "--nats-url", NATS_URL)
    assert shown["driver"] == ("nats", "yaml")
    assert shown["nats.url"] == (NATS_URL, "flag --nats-url")


def test_driver_in_env_url_by_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GOCHAN_DRIVER", "nats")
    shown = check_config(capsys, "--nats-url", NATS_URL, "--nats-jetstream", "--nats-prefix=g.")
    assert shown["driver"] == ("nats", "env GOCHAN_DRIVER")
    assert shown["nats.url"] == (NATS_URL, "flag --nats-url")
    assert shown["nats.jetstream"] == ("true", "flag --nats-jetstream")
    assert shown["nats.prefix"] == ("g.", "flag --nats-prefix")


def test_yaml_block_with_driver_by_flag_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f"nats:\n  url: {NATS_URL}\n  reconnect-min: 0.5\nredis:\n  url: redis://x\n"
    path = yaml_file(tmp_path, text)
    shown = check_config(capsys, "--config", path, "--driver", "nats")
    assert shown["nats.url"] == (NATS_URL, "yaml")
    assert shown["nats.reconnect_min"] == ("0.5", "yaml")
    assert not any(key.startswith("redis.") for key in shown)  # another driver's block: unused
    monkeypatch.setenv("GOCHAN_DRIVER", "nats")
    monkeypatch.setenv("GOCHAN_NATS_PREFIX", "env.")
    shown = check_config(capsys, "--config", path, "--nats-url", "nats://flag:4222")
    assert shown["nats.url"] == ("nats://flag:4222", "flag --nats-url")  # flag over YAML
    assert shown["nats.prefix"] == ("env.", "env GOCHAN_NATS_PREFIX")


def test_driver_options_from_env_mapping(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "driver: nats\nnats: {url: nats://yaml:1}\n")
    config, sources = load(
        yaml_file=path,
        env={"GOCHAN_NATS_URL": NATS_URL, "GOCHAN_NATS_PUBLISH_FLUSH": "off"},
    )
    assert config.driver_options == {"url": NATS_URL, "publish_flush": False}
    assert sources["nats.url"] == "env GOCHAN_NATS_URL"
    # variables of a driver not in use are not options
    config = Config.from_sources(env={"GOCHAN_NATS_URL": NATS_URL})
    assert (config.driver, config.driver_options) == ("mem", {})


@pytest.mark.parametrize("source", ["yaml", "env", "flag", "python"])
def test_driver_option_types(tmp_path: Path, source: str) -> None:
    line = "nats.reconnect_min: expected a number > 0, got 'x'"
    with pytest.raises(ConfigurationError) as caught:
        if source == "yaml":
            path = yaml_file(tmp_path, "driver: nats\nnats:\n  reconnect_min: x\n")
            Config.from_sources(yaml_file=path, env={})
        elif source == "env":
            Config.from_sources(env={"GOCHAN_DRIVER": "nats", "GOCHAN_NATS_RECONNECT_MIN": "x"})
        elif source == "flag":
            load(env={}, flags={"driver": "nats"}, driver_flags={"nats-reconnect-min": "x"})
        else:
            Config(driver="nats", driver_options={"reconnect_min": "x"})
    assert str(caught.value) == line


def test_driver_option_errors_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, line in [
        (["--nats-reconnect-min", "0"], "nats.reconnect_min: expected a number > 0, got '0'"),
        (["--nats-stream-max-msgs-per-subject", "1.5"],
         "nats.stream_max_msgs_per_subject: expected an integer, got '1.5'"),
        (["--nats-jetstream=maybe"], f"nats.jetstream: expected {BOOL}, got 'maybe'"),
        (["--nats-url"], "--nats-url needs a value"),
        (["--nats-colour", "red"], "driver 'nats' has no option 'colour' (options: connect_"),
        (["--redis-url", "x"], "--redis-url is an option of driver 'redis'; the driver is 'nats'"),
        (["--bogus", "1"], "unknown option '--bogus'"),
        (["--nats-url", ""], "nats url must name at least one server"),  # the driver's own check
    ]:  # fmt: skip
        code, out, err = cli(capsys, "--check-config", "--driver", "nats", *argv)
        assert code == 2 and out == "" and err.startswith(f"gochan: {line}"), (argv, err)
        assert err.count("\n") == 1


def test_stream_max_msgs_minus_one_is_an_option_value(capsys: pytest.CaptureFixture[str]) -> None:
    shown = check_config(capsys, "--driver", "nats", "--nats-stream-max-msgs-per-subject", "-1")
    assert shown["nats.stream_max_msgs_per_subject"] == (
        "-1",
        "flag --nats-stream-max-msgs-per-subject",
    )


# -- missing extras ------------------------------------------------------------


def test_missing_extra_is_one_line() -> None:
    """With nats-py hidden, ``--nats-url`` and YAML blocks name the extra,
    not 'no option' or a traceback."""
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "from gochan.server.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for args in (["--driver", "nats"], ["--driver", "nats", "--nats-url", NATS_URL]):
        result = subprocess.run(
            [sys.executable, "-c", code, "--check-config", *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2 and result.stdout == ""
        assert (
            result.stderr == "gochan: driver 'nats' needs its extra: pip install 'gochan[nats]'\n"
        )


def test_missing_extra_of_a_registered_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gochan import drivers

    (tmp_path / "gochan_fake_broker.py").write_text("import no_such_broker_client\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(drivers.DRIVERS, "fake", ("gochan_fake_broker", "FakeDriver", "fake"))
    with pytest.raises(MissingExtraError) as caught:
        Config(driver="fake")
    assert str(caught.value) == "driver 'fake' needs its extra: pip install 'gochan[fake]'"
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, ValueError)
    code, _, err = cli(capsys, "--check-config", "--driver", "fake", "--fake-url", "x")
    assert (code, err) == (2, "gochan: driver 'fake' needs its extra: pip install 'gochan[fake]'\n")


def test_a_broken_driver_module_is_not_called_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gochan import drivers

    monkeypatch.setitem(drivers.DRIVERS, "broken", ("gochan.drivers.no_such", "X", "broken"))
    with pytest.raises(ModuleNotFoundError) as caught:
        Config(driver="broken")
    assert not isinstance(caught.value, MissingExtraError)


# -- --check-config ----------------------------------------------------------------


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    path = yaml_file(
        tmp_path,
        "port: 4001\npublish_key: hunter2-secret\ncors_origins: http://a.test,http://b.test\n"
        "nats:\n  url: nats://user:pw-secret@h:4222\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--check-config", "--config", path,
         "--heartbeat", "7"],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "GOCHAN_DRIVER": "nats", "GOCHAN_CLIENT_TTL": "9"},
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    lines = {line.split(" = ")[0].strip(): line for line in result.stdout.splitlines()}
    assert lines["port"].endswith("= 4001  (yaml)")
    assert lines["client_ttl"].endswith("= 9  (env GOCHAN_CLIENT_TTL)")
    assert lines["heartbeat"].endswith("= 7  (flag --heartbeat)")
    assert lines["host"].endswith("= 127.0.0.1  (default)")
    assert lines["driver"].endswith("= nats  (env GOCHAN_DRIVER)")
    assert lines["cors_origins"].endswith("= http://a.test,http://b.test  (yaml)")
    assert lines["publish_key"].endswith("= <redacted>  (yaml)")
    assert lines["nats.url"].endswith("= nats://user:***@h:4222  (yaml)")
    assert lines["nats.reconnect_min"].endswith("= 0.1  (default)")
    assert "secret" not in result.stdout
    assert set(lines) >= {"max_connections", "allowed_hosts", "static_dir", "nats.jetstream"}


def test_check_config_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, 'port: "abc"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--check-config", "--config", path],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "gochan: port: expected an integer 0..65535, got 'abc'\n"
