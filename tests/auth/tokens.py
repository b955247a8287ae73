"""Real tokens for the authorization tests: HS256 with a shared secret, and
RS256/ES256 key pairs written as PEM files and JWKS documents."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "a-test-secret-of-at-least-32-bytes!!"
OTHER_SECRET = "another-secret-of-at-least-32-bytes!"
PUBLISH_KEY = "server-side-publish-key"


def claims(
    sub: str = "alice",
    subscribe: Iterable[str] = (),
    publish: Iterable[str] = (),
    exp_in: float | None = 300,
    **extra: Any,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "sub": sub,
        "gochan": {"subscribe": list(subscribe), "publish": list(publish)},
        **extra,
    }
    if exp_in is not None:
        payload["exp"] = int(time.time() + exp_in)
    return payload


def token(
    sub: str = "alice",
    subscribe: Iterable[str] = (),
    publish: Iterable[str] = (),
    *,
    key: Any = SECRET,
    algorithm: str = "HS256",
    kid: str | None = None,
    exp_in: float | None = 300,
    **extra: Any,
) -> str:
    headers = {"kid": kid} if kid is not None else None
    payload = claims(sub, subscribe, publish, exp_in, **extra)
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


def write_jwks(keys: dict[str, tuple[Any, str]], path: Path) -> str:
    """A JWKS file of the public halves of ``{kid: (private key, algorithm)}``."""
    entries = []
    for kid, (key, algorithm) in keys.items():
        algo = jwt.get_algorithm_by_name(algorithm)
        jwk = json.loads(algo.to_jwk(key.public_key()))
        entries.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
    path.write_text(json.dumps({"keys": entries}))
    return str(path)
