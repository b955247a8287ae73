"""Unit tests of the pieces: topic patterns, grants, cookies, where a token
is read, the token buckets, and the configuration of authorization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gochan import AuthError, AuthRequest, Config, ConfigurationError, Grant, TopicPatterns
from gochan.auth import JWTAuthorizer, parse_cookies, same_secret
from gochan.ratelimit import RateLimit
from gochan.server.__main__ import main
from tests.auth.tokens import SECRET, bearer, ec_key, rsa_key, token, write_jwks, write_public_pem

# -- patterns --------------------------------------------------------------------


def test_exact_topics_and_prefixes() -> None:
    patterns = TopicPatterns(["news", "user.42.*", "room.*", "room.vip.*"])
    assert patterns.allows("news")
    assert not patterns.allows("news.extra") and not patterns.allows("new")
    assert patterns.allows("user.42.inbox") and patterns.allows("user.42.")
    assert not patterns.allows("user.421") and not patterns.allows("user.4")
    assert patterns.allows("room.vip.1") and patterns.allows("room.a")
    assert patterns.prefixes == ("room.", "user.42.")  # room.vip. is covered by room.
    assert patterns.refused(["news", "b", "room.x", "c"]) == ["b", "c"]


def test_star_alone_is_every_topic_and_nothing_is_no_topic() -> None:
    assert TopicPatterns(["*"]).allows("anything at all")
    assert TopicPatterns(["*"]).refused(["a", "b"]) == []
    assert not TopicPatterns([]).allows("a")
    assert not TopicPatterns([])
    assert not TopicPatterns(["a*b"]).allows("axb")  # only a trailing * is a wildcard
    assert TopicPatterns(["a*b"]).allows("a*b")


def test_bad_patterns_are_refused() -> None:
    with pytest.raises(TypeError):
        TopicPatterns("news")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TopicPatterns(["ok", ""])
    with pytest.raises(ValueError):
        TopicPatterns([3])  # type: ignore[list-item]


_names = st.text(alphabet="ab.*", min_size=1, max_size=6)


@given(st.lists(_names, max_size=8), st.text(alphabet="ab.*", max_size=8))
def test_matching_agrees_with_the_definition(patterns: list[str], topic: str) -> None:
    expected = any((p.endswith("*") and topic.startswith(p[:-1])) or p == topic for p in patterns)
    assert TopicPatterns(patterns).allows(topic) is expected


# -- grants, requests, secrets -------------------------------------------------------


def test_a_grant_needs_an_identity() -> None:
    grant = Grant("alice", ["a"], TopicPatterns(["b.*"]), exp=12)
    assert grant.subscribe.allows("a") and grant.publish.allows("b.1") and grant.exp == 12.0
    for bad in ("", None):
        with pytest.raises(ValueError):
            Grant(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Grant("alice", exp="soon")  # type: ignore[arg-type]
    assert AuthError(403, "no").status == 403
    with pytest.raises(ValueError):
        AuthError(200, "fine")


def test_cookies_and_the_request_view() -> None:
    assert parse_cookies('a=1; b="two"; a=3; junk; =x; c=') == {"a": "1", "b": "two", "c": ""}
    view = AuthRequest("GET", "/events", "topic=a&topic=b%20c", {"cookie": "k=v"}, "10.0.0.1")
    assert view.query == {"topic": ["a", "b c"]}
    assert view.cookies == {"k": "v"}
    assert "k=v" not in repr(view)


def test_secrets_are_compared_as_bytes() -> None:
    assert same_secret("s3cret", "s3cret")
    assert not same_secret("s3cre", "s3cret") and not same_secret("", "s3cret")
    assert same_secret("é".encode().decode("latin-1"), "é")  # UTF-8 bytes read as Latin-1


def _view(headers: dict[str, str], query: str = "") -> AuthRequest:
    return AuthRequest("GET", "/events", query, {k.lower(): v for k, v in headers.items()})


def test_where_the_token_is_read_in_order() -> None:
    hook = JWTAuthorizer(SECRET.encode(), query_param=True)
    header, cookie, param = token("header"), token("cookie"), token("param")
    both = {**bearer(header), "cookie": f"gochan_token={cookie}"}
    assert hook(_view(both, f"access_token={param}")).sub == "header"
    assert hook(_view({"cookie": f"gochan_token={cookie}"}, f"access_token={param}")).sub == (
        "cookie"
    )
    assert hook(_view({}, f"access_token={param}")).sub == "param"
    closed = JWTAuthorizer(SECRET.encode())
    with pytest.raises(AuthError) as refused:
        closed(_view({}, f"access_token={param}"))
    assert refused.value.status == 401


def test_claims_are_checked() -> None:
    hook = JWTAuthorizer(SECRET.encode())
    grant = hook(_view(bearer(token("a", ["x.*"], ["y"]))))
    assert grant.subscribe.allows("x.1") and grant.publish.allows("y") and grant.exp
    assert hook(_view(bearer(token("a", exp_in=None)))).exp is None
    for bad in ({"gochan": []}, {"gochan": {"subscribe": "x"}}, {"gochan": {"publish": [1]}}):
        import jwt

        raw = jwt.encode({"sub": "a", **bad}, SECRET, algorithm="HS256")
        with pytest.raises(AuthError):
            hook(_view(bearer(raw)))


# -- buckets -----------------------------------------------------------------------


def test_publish_buckets_refill_at_the_rate() -> None:
    now = [0.0]
    buckets = RateLimit(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # each key its own bucket
    now[0] = 0.5
    assert buckets.take("a") == 0.0  # one token back after 1/rate seconds
    assert buckets.take("a") > 0
    assert RateLimit.retry_after(0.01) == 1 and RateLimit.retry_after(2.5) == 3


# -- configuration -------------------------------------------------------------------


def test_authorization_is_on_only_with_a_key() -> None:
    assert JWTAuthorizer.from_config(Config()) is None
    assert not Config().auth_enabled
    assert isinstance(JWTAuthorizer.from_config(Config(jwt_key=SECRET)), JWTAuthorizer)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"jwt_algorithms": ["none"]}, "jwt_algorithms: unknown algorithm 'none'"),
        ({"jwt_algorithms": []}, "jwt_algorithms: name at least one"),
        ({"jwt_algorithms": ["HS256", "RS256"]}, "cannot be mixed"),
        ({"jwt_cookie": "a;b"}, "jwt_cookie"),
        ({"max_streams_per_client": 0}, "max_streams_per_client"),
        ({"publish_rate_per_identity": 0}, "publish_rate_per_identity"),
    ],
)
def test_bad_settings_are_one_line_errors(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Config(**settings)  # type: ignore[arg-type]


def test_bad_key_files_are_one_line_errors_at_startup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "x"}]}))
    cases = [
        (["--jwt-key", "short"], "at least 32 bytes"),
        (["--jwt-key", str(tmp_path / "missing.pem"), "--jwt-algorithms", "RS256"], "cannot read"),
        (["--jwt-key", str(junk), "--jwt-algorithms", "RS256"], "not a PEM public key"),
        (["--jwt-jwks-file", str(tmp_path / "none.json")], "jwt_jwks_file: cannot read"),
        (["--jwt-jwks-file", str(jwks), "--jwt-algorithms", "RS256"], "jwt_jwks_file: key 'x'"),
    ]
    for flags, message in cases:
        assert main([*flags, "--check-config"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert "short" not in err


def test_check_config_never_prints_the_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--jwt-key", SECRET, "--jwt-audience", "gochan", "--check-config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "jwt_key" in out and "<redacted>" in out and "jwt_audience" in out


def test_a_jwks_key_outside_the_algorithms_is_skipped(tmp_path: Path) -> None:
    path = write_jwks({"r": (rsa_key(), "RS256"), "e": (ec_key(), "ES256")}, tmp_path / "k.json")
    hook = JWTAuthorizer.from_config(Config(jwt_jwks_file=path, jwt_algorithms=["ES256"]))
    assert hook is not None and set(hook.jwks) == {"e"}
    pem = write_public_pem(rsa_key(), tmp_path / "p.pem")
    assert JWTAuthorizer.from_config(Config(jwt_key=pem, jwt_algorithms=["RS256"])) is not None


def test_verified_tokens_are_kept_until_their_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import gochan.auth

    monkeypatch.setattr(gochan.auth, "VERIFIED_TOKENS_KEPT", 2)
    hook = JWTAuthorizer(SECRET.encode())
    first = _view(bearer(token("a", ["x"])))
    grant = hook(first)
    assert hook(first) is grant  # not verified again
    grant.exp = time.time() - 1  # as if its exp had passed: verified again, not trusted
    assert hook(first) is not grant
    for sub in ("b", "c"):
        hook(_view(bearer(token(sub))))
    assert len(hook._verified) == 2  # bounded: the oldest went
    forged = token("a", ["x"], key="x" * 40)
    with pytest.raises(AuthError):
        hook(_view(bearer(forged)))
    assert forged not in hook._verified
