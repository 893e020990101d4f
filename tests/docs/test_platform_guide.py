"""docs/platform-guide.md runs as written: its blocks in order, in one platform engineer's shell
(the CLI and curl through the gateway's ``/api``), against the whole stack. Between blocks the
test files what the guide says teams file, and checks what each block changed."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import httpx
import yaml

from tests.approval.support import eventually
from tests.docs.conftest import Stack
from tests.docs.runner import (
    ROOT,
    Session,
    block,
    checkout,
    documents,
    need,
    reader_env,
    substitute,
)
from tests.helpers import bearer, member_key, ok, unique

DOC = "docs/platform-guide.md"
KEY = re.compile(r"stw_[A-Za-z0-9]{8}_[A-Za-z0-9]{32}")


async def test_the_platform_guides_blocks_run_in_order_as_one_engineers_session(
    stack: Stack, authz: httpx.AsyncClient, tmp_path: Path
) -> None:
    need("curl", "jq")
    project = unique("fraud-detection")
    admin = bearer(stack.admin_key)
    http = httpx.AsyncClient(timeout=30)

    fill = functools.partial(stack.fill, project=project)
    get = functools.partial(stack.get, http)

    # Only the services' own URLs are not the reader's: the CLI goes through the gateway.
    env = reader_env(tmp_path)
    folder = checkout(tmp_path)
    async with http, Session(env, folder) as shell:
        setup = block(DOC, "# The platform engineer's guide")
        await shell.run(fill(substitute(setup, {"=stw_...": f"={stack.admin_key}"})))

        # -- 1. Projects, roles and scopes
        out = await shell.run(fill(block(DOC, "## 1. Projects")))
        assert (await get("authz", f"/v1/projects/{project}"))["created_by"] == "admin"
        assert json.loads(out.splitlines()[-1])["role"] == "developer"  # curl's answer
        members = await get("authz", f"/v1/projects/{project}/members")
        assert {m["subject"]: m["role"] for m in members} == {"alice": "developer"}

        # -- 2. API keys: created, rotated with a grace period, the old one revoked.
        out = await shell.run(fill(block(DOC, "## 2. API keys")))
        old, new = KEY.findall(out)  # each shown once: the created key, then its successor
        keys = await get("authz", f"/v1/projects/{project}/keys")
        apps = [k for k in keys if k["name"] == "billing-app"]
        assert sorted(k["status"] for k in apps) == ["active", "revoked"]
        assert {k["owner"] for k in apps} == {"alice"}

        async def refused() -> bool:
            answer = await http.get(stack.urls["gateway"] + "/v1/models", headers=bearer(old))
            return answer.status_code == 401

        await eventually(refused, within=5, what="the gateway to refuse the revoked key")
        answer = await http.get(stack.urls["gateway"] + "/v1/models", headers=bearer(new))
        assert answer.status_code == 200  # the key it was rotated to

        # -- 4. The catalog
        out = await shell.run(fill(block(DOC, "## 4. The catalog")))
        models = yaml.safe_load((ROOT / "examples/gitops/models.yaml").read_text())["models"]
        assert f"created {len(models)}, updated 0, unchanged 0 (dry run)" in out
        assert "io.github.acme/tickets" in out
        listed = await get("catalog", "/v1/catalog?q=acme/chat-8b")
        assert [v["status"] for v in listed["items"]] == ["draft"]

        # -- 5. Approvals: alice asks for two models to be admitted; Pat approves one, rejects
        # the other.
        scopes = ["catalog:read", "requests:write"]
        alice = await member_key(authz, stack.admin_key, project, "developer", scopes, "alice")
        asked = []
        for name, version in (
            ("acme/chat-8b", "1.0"),
            ("HuggingFaceTB/SmolLM2-135M-Instruct", "1.0.0"),
        ):
            payload = {"asset_kind": "model", "asset_name": name, "version": version}
            filed = await ok(
                await http.post(
                    f"{stack.urls['approval']}/v1/projects/{project}/requests",
                    json={"kind": "asset", "payload": payload},
                    headers=bearer(alice),
                ),
                201,
            )
            asked.append(filed["id"])
        code = substitute(block(DOC, "## 5. Approvals"), {"<id>": asked[0], "<other-id>": asked[1]})
        out = await shell.run(fill(code))
        assert all(i in out for i in asked)
        approved = await get("approval", f"/v1/requests/{asked[0]}")
        rejected = await get("approval", f"/v1/requests/{asked[1]}")
        assert (approved["status"], approved["decision_comment"]) == (
            "approved",
            "ok for the pilot",
        )
        assert (rejected["status"], rejected["decision_comment"]) == (
            "rejected",
            "use the 8B model",
        )

        # -- 6. Fallbacks, for a model the project is entitled to.
        await ok(
            await http.put(
                f"{stack.urls['authz']}/v1/projects/{project}/entitlements/model/acme/chat-8b",
                headers=admin,
            ),
            201,
        )
        [entitlement] = documents(await shell.run(fill(block(DOC, "## 6. Endpoints"))))
        assert (entitlement["asset_name"], entitlement["fallbacks"]) == (
            "acme/chat-8b",
            ["shared/chat-8b"],
        )

        # -- 7. Quotas and cost
        out = await shell.run(fill(block(DOC, "## 7. Quotas")))
        quota = json.JSONDecoder().raw_decode(out)[0]
        assert (quota["window"], quota["limits"]["total_tokens"]) == ("month", 50000000)
        assert quota["webhook_url"] == "https://hooks.example.com/steward"
        assert "total_tokens" in out  # the usage table's header

        # -- 8. Audit: the report of a period, written to a file.
        out = await shell.run(fill(block(DOC, "## 8. Audit")))
        assert "wrote q4-audit.html" in out
        report = (folder / "q4-audit.html").read_text()
        assert "Steward audit report" in report and "2026-10-01" in report
