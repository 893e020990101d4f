"""A test identity provider on a real socket: OIDC discovery, JWKS, and Keycloak's realm paths.

It signs tokens with real RSA/EC keys so the verifier runs exactly as against Keycloak.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

REALM = "steward"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = RSAAlgorithm if self.alg.startswith(("RS", "PS")) else ECAlgorithm
        data: dict[str, Any] = json.loads(algorithm.to_jwk(public))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}


def new_key(kid: str, alg: str = "RS256") -> SigningKey:
    if alg.startswith("ES"):
        return SigningKey(kid, alg, ec.generate_private_key(ec.SECP256R1()))
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


@dataclass
class Issuer:
    base_url: str = ""
    keys: dict[str, SigningKey] = field(default_factory=dict)
    jwks_hits: int = 0

    @property
    def issuer(self) -> str:
        return self.base_url

    @property
    def keycloak_issuer(self) -> str:
        return f"{self.base_url}/realms/{REALM}"

    def add(self, key: SigningKey) -> SigningKey:
        self.keys[key.kid] = key
        return key

    def remove(self, kid: str) -> None:
        del self.keys[kid]

    def token(
        self,
        key: SigningKey,
        *,
        issuer: str | None = None,
        audience: str = "steward",
        lifetime: int = 300,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": issuer or self.issuer,
            "aud": audience,
            "sub": "user-1",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "scope": "openid projects:read keys:manage",
            **claims,
        }
        return jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": key.kid})

    def app(self) -> Starlette:
        async def discovery(request: Request) -> JSONResponse:
            return JSONResponse({"issuer": self.issuer, "jwks_uri": f"{self.base_url}/jwks"})

        async def jwks(request: Request) -> JSONResponse:
            self.jwks_hits += 1
            return JSONResponse({"keys": [k.jwk() for k in self.keys.values()]})

        async def keycloak_discovery(request: Request) -> JSONResponse:
            return JSONResponse(
                {
                    "issuer": self.keycloak_issuer,
                    "jwks_uri": f"{self.keycloak_issuer}/protocol/openid-connect/certs",
                }
            )

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
                Route(f"/realms/{REALM}/.well-known/openid-configuration", keycloak_discovery),
                Route(f"/realms/{REALM}/protocol/openid-connect/certs", jwks),
            ]
        )
