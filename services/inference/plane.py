"""What the routes and the event handlers share: the pool, the runtimes' reconciler, the catalog.

The service spec (and its handler map) is built before the lifespan creates any of this, so
handlers hold a ``PlaneRef`` that ``setup`` fills in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from libs.common.clients import CatalogClient
from libs.common.mcp_packages import PackageProblem, stdio_package
from libs.common.netpolicy import AddressPolicy
from services.inference.config import InferenceConfig
from services.inference.domain import CatalogVersion, Pool, VersionLookup
from services.inference.reconciler import Reconciler


@dataclass
class Plane:
    config: InferenceConfig
    pool: Pool
    credential_key: bytes
    reconciler: Reconciler
    catalog: CatalogClient
    # The service's own catalog:read key, for provisioning from approval events (no caller).
    service_credential: str | None
    # Where a tenant-named upstream (an external endpoint's URL) may live.
    address_policy: AddressPolicy

    async def catalog_version(
        self, credential: str, kind: str, name: str, version: str
    ) -> CatalogVersion | None:
        """The version's status, source URI and (an MCP server's) stdio package, asked with
        ``credential``; None if unknown. A package that cannot run as published (a required
        argument without a value) reads as no package."""
        asset = await self.catalog.asset(credential, kind, name)
        if asset is None:
            return None
        found = next((v for v in asset["versions"] if v["version"] == version), None)
        if found is None:
            return None
        spec = found.get("spec") or {}
        serving = spec.get("serving") or {}
        package = None
        if kind == "mcp_server":
            with contextlib.suppress(PackageProblem):
                package = stdio_package(spec.get("server") or {})
        return CatalogVersion(
            status=found["status"],
            source_uri=spec.get("source_uri"),
            serving_runtime=serving.get("runtime"),
            package=package,
        )

    def service_lookup(self) -> VersionLookup | None:
        """Catalog look-ups with the service key, or None (trust the approval) without one."""
        credential = self.service_credential
        if credential is None:
            return None

        async def lookup(kind: str, name: str, version: str) -> CatalogVersion | None:
            return await self.catalog_version(credential, kind, name, version)

        return lookup


class PlaneRef:
    plane: Plane | None = None

    def get(self) -> Plane:
        if self.plane is None:
            raise RuntimeError("the inference service is still starting")
        return self.plane
