"""A TEST-ONLY Kubernetes API double: no API server can run here, so this one speaks the wire
protocol the real ``kubernetes-asyncio`` client expects, on a real loopback socket.

What it implements, as the API server does: bearer-token authentication; namespaces; namespaced
custom objects (create, get, list, JSON merge patch, delete) with ``metadata.uid``,
``resourceVersion``, ``generation`` and ``creationTimestamp``; ``?watch=true`` streams of
newline-delimited ``WatchEvent`` JSON (``ADDED``/``MODIFIED``/``DELETED``) filtered by
``fieldSelector=metadata.name=…`` and resumed after ``resourceVersion``, ending after
``timeoutSeconds``; errors as ``Status`` objects (409 AlreadyExists, 404 NotFound, 401, 415).

It also plays the KServe controller: shortly after an ``InferenceService`` (or
``LLMInferenceService``) is created it reports progress, then either ``Ready`` with
``status.url`` (pointing at a server the test starts for it, like a pod) or a load failure
with KServe's ``modelStatus`` fields, as each namespace's ``Outcome`` says. And ToolHive's
operator: an ``MCPServer`` goes ``Pending``, then ``Ready`` with the proxy's ``status.url`` (a
server the test starts with the environment its ``spec.secrets`` name, read from the Secrets
stored here, as the pod would get them) or ``Failed``. Core ``Secret``s: create, replace, get,
delete, with ``stringData`` folded into base64 ``data`` as the API server does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TOKEN = "kube-double-token"
SERVING_KINDS = {"inferenceservices", "llminferenceservices"}
MCP_SERVERS = "mcpservers"


@dataclass
class Outcome:
    """What the pretend KServe controller does with a new serving object."""

    ready: bool = True
    transition: str = "BlockedByFailedLoad"
    reason: str = "ModelLoadFailed"
    message: str = "failed to load model: weights not found"
    delay: float = 0.1


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, **details: Any) -> JSONResponse:
    return JSONResponse(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": details,
            "code": code,
        },
        status_code=code,
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class KubeDouble:
    # Plays the pods: given the serving object, start its server and return its URL.
    start_pod: Callable[[dict[str, Any]], Awaitable[str]] | None = None
    # Plays an MCPServer's proxy and server: given the object and its environment, a base URL.
    start_mcp_pod: Callable[[dict[str, Any], dict[str, str]], Awaitable[str]] | None = None
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    objects: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # While down, every request is a 503 and open watches end (an API server restarting).
    down: bool = False
    watches: int = 0  # watch streams opened
    _rv: int = 0
    _log: list[tuple[int, tuple[str, str, str, str], str, dict[str, Any]]] = field(
        default_factory=list
    )
    # Set (and replaced) on every change. Not a Condition: on Python 3.11 a Condition.wait()
    # cancelled while re-taking its lock can leave the lock unowned or held (a watch closed by
    # its client then hung the double's other coroutines).
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _deleted: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _record(self, key: tuple[str, str, str, str, str], kind: str) -> None:
        obj = self.objects.get(key)
        if kind == "DELETED":
            obj = self._deleted[key]
        assert obj is not None
        self._log.append((self._rv, key[:4], kind, copy.deepcopy(obj)))
        self._notify()

    async def set_down(self, down: bool) -> None:
        self.down = down
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def find(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        for key, obj in self.objects.items():
            if key[3] == plural and key[2] == namespace and key[4] == name:
                return obj
        return None

    # -- the pretend KServe controller ---------------------------------------------------------

    async def _reconcile(self, key: tuple[str, str, str, str, str]) -> None:
        outcome = self.outcomes.get(key[2], Outcome())
        await asyncio.sleep(outcome.delay / 2)
        if key not in self.objects:
            return
        await self._set_status(
            key,
            {
                "conditions": [
                    {"type": "PredictorReady", "status": "Unknown", "reason": "Deploying"},
                    {
                        "type": "Ready",
                        "status": "Unknown",
                        "reason": "PredictorNotReady",
                        "message": "predictor pods starting",
                        "lastTransitionTime": _now(),
                    },
                ],
                "modelStatus": {
                    "transitionStatus": "InProgress",
                    "states": {"activeModelState": "Loading", "targetModelState": "Loaded"},
                },
            },
        )
        await asyncio.sleep(outcome.delay / 2)
        if key not in self.objects:
            return
        if outcome.ready:
            url = await self.start_pod(self.objects[key]) if self.start_pod else "http://0.0.0.0:1"
            status: dict[str, Any] = {
                "conditions": [
                    {"type": "IngressReady", "status": "True", "lastTransitionTime": _now()},
                    {"type": "PredictorReady", "status": "True", "lastTransitionTime": _now()},
                    {"type": "Ready", "status": "True", "lastTransitionTime": _now()},
                ],
                "url": url,
                "address": {"url": url},
                "modelStatus": {
                    "transitionStatus": "UpToDate",
                    "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                    "copies": {"failedCopies": 0, "totalCopies": 1},
                },
            }
        else:
            status = {
                "conditions": [
                    {
                        "type": "PredictorReady",
                        "status": "False",
                        "reason": outcome.reason,
                        "message": outcome.message,
                    },
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": outcome.reason,
                        "message": outcome.message,
                        "lastTransitionTime": _now(),
                    },
                ],
                "modelStatus": {
                    "transitionStatus": outcome.transition,
                    "states": {"activeModelState": "FailedToLoad", "targetModelState": ""},
                    "lastFailureInfo": {
                        "reason": outcome.reason,
                        "message": outcome.message,
                        "exitCode": 1,
                    },
                    "copies": {"failedCopies": 1, "totalCopies": 1},
                },
            }
        await self._set_status(key, status)

    # -- the pretend ToolHive operator ---------------------------------------------------------

    def secret_env(self, namespace: str, obj: dict[str, Any]) -> dict[str, str]:
        """The environment an MCPServer's pod gets from the Secrets its ``spec.secrets`` name."""
        env: dict[str, str] = {}
        for ref in obj["spec"].get("secrets") or []:
            secret = self.secrets.get((namespace, ref["name"]))
            if secret is None or ref["key"] not in (secret.get("data") or {}):
                raise KeyError(f"secret {ref['name']}/{ref['key']} not found")
            value = base64.b64decode(secret["data"][ref["key"]]).decode()
            env[ref.get("targetEnvName") or ref["key"]] = value
        return env

    async def _reconcile_mcp(self, key: tuple[str, str, str, str, str]) -> None:
        outcome = self.outcomes.get(key[2], Outcome())
        await asyncio.sleep(outcome.delay / 2)
        if key not in self.objects:
            return
        await self._set_status(key, {"phase": "Pending", "message": "Deployment is being created"})
        await asyncio.sleep(outcome.delay / 2)
        obj = self.objects.get(key)
        if obj is None:
            return
        if not outcome.ready:
            await self._set_status(key, {"phase": "Failed", "message": outcome.message})
            return
        try:
            env = self.secret_env(key[2], obj)
        except KeyError as missing:
            message = f"CreateContainerConfigError: {missing.args[0]}"
            await self._set_status(key, {"phase": "Failed", "message": message})
            return
        base = await self.start_mcp_pod(obj, env) if self.start_mcp_pod else "http://0.0.0.0:1"
        await self._set_status(
            key, {"phase": "Ready", "url": f"{base}/mcp", "readyReplicas": 1, "message": ""}
        )

    async def _set_status(
        self, key: tuple[str, str, str, str, str], status: dict[str, Any]
    ) -> None:
        obj = self.objects.get(key)
        if obj is None:
            return
        obj["status"] = status
        obj["metadata"]["resourceVersion"] = self._next_rv()
        await self._record(key, "MODIFIED")

    # -- HTTP ----------------------------------------------------------------------------------

    def app(self) -> Starlette:
        async def guard(request: Request) -> Response | None:
            self.requests.append((request.method, request.url.path))
            if self.down:
                return _status(503, "ServiceUnavailable", "the API server is restarting")
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return _status(401, "Unauthorized", "Unauthorized")
            return None

        async def namespaces(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            body = await request.json()
            name = body["metadata"]["name"]
            if name in self.namespaces:
                return _status(
                    409,
                    "AlreadyExists",
                    f'namespaces "{name}" already exists',
                    name=name,
                    kind="namespaces",
                )
            body["metadata"].update(
                uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_now()
            )
            body["status"] = {"phase": "Active"}
            self.namespaces[name] = body
            return JSONResponse(body, status_code=201)

        async def namespace(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            name = request.path_params["name"]
            if name not in self.namespaces:
                return _status(404, "NotFound", f'namespaces "{name}" not found', name=name)
            return JSONResponse(self.namespaces[name])

        async def collection(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            p = request.path_params
            group, version, ns, plural = p["group"], p["version"], p["namespace"], p["plural"]
            if request.method == "POST":
                return await self._create(request, group, version, ns, plural)
            selector = request.query_params.get("fieldSelector", "")
            name = selector.removeprefix("metadata.name=") if selector else None
            if request.query_params.get("watch") in ("true", "1", "True"):
                self.watches += 1
                since = int(request.query_params.get("resourceVersion") or 0)
                timeout = float(request.query_params.get("timeoutSeconds") or 1800)
                return StreamingResponse(
                    self._watch((group, version, ns, plural), name, since, timeout),
                    media_type="application/json",
                )
            items = [
                o
                for k, o in self.objects.items()
                if k[:4] == (group, version, ns, plural) and (name is None or k[4] == name)
            ]
            return JSONResponse(
                {
                    "apiVersion": f"{group}/{version}",
                    "kind": "List",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": items,
                }
            )

        async def item(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            p = request.path_params
            key = (p["group"], p["version"], p["namespace"], p["plural"], p["name"])
            obj = self.objects.get(key)
            if obj is None:
                return _status(
                    404,
                    "NotFound",
                    f'{key[3]}.{key[0]} "{key[4]}" not found',
                    name=key[4],
                    group=key[0],
                    kind=key[3],
                )
            if request.method == "GET":
                return JSONResponse(obj)
            if request.method == "DELETE":
                del self.objects[key]
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self._deleted[key] = obj
                await self._record(key, "DELETED")
                return JSONResponse(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {"name": key[4], "group": key[0], "kind": key[3]},
                    }
                )
            content_type = request.headers.get("content-type", "")
            patch = await request.json()
            if content_type.startswith("application/json-patch+json"):
                if not isinstance(patch, list):  # as the API server answers an object here
                    return _status(
                        400,
                        "BadRequest",
                        "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                    )
                return _status(415, "UnsupportedMediaType", "the double speaks merge patch only")
            if not content_type.startswith("application/merge-patch+json"):
                return _status(415, "UnsupportedMediaType", f"unsupported {content_type}")
            status = obj.get("status")
            patched = merge_patch(obj, patch)
            patched["status"] = status  # the main resource ignores status changes
            patched["metadata"]["resourceVersion"] = self._next_rv()
            patched["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            self.objects[key] = patched
            await self._record(key, "MODIFIED")
            return JSONResponse(patched)

        async def secrets(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            ns = request.path_params["namespace"]
            if ns not in self.namespaces:
                return _status(404, "NotFound", f'namespaces "{ns}" not found', name=ns)
            name = request.path_params.get("name")
            found = self.secrets.get((ns, name or ""))
            if request.method == "GET":
                if found is None:
                    return _status(404, "NotFound", f'secrets "{name}" not found', name=name)
                return JSONResponse(found)
            if request.method == "DELETE":
                if self.secrets.pop((ns, name or ""), None) is None:
                    return _status(404, "NotFound", f'secrets "{name}" not found', name=name)
                return JSONResponse({"kind": "Status", "apiVersion": "v1", "status": "Success"})
            body = await request.json()
            body_name = body["metadata"]["name"]
            if request.method == "POST" and (ns, body_name) in self.secrets:
                message = f'secrets "{body_name}" already exists'
                return _status(409, "AlreadyExists", message, name=body_name, kind="secrets")
            if request.method == "PUT" and found is None:
                return _status(404, "NotFound", f'secrets "{name}" not found', name=name)
            data = dict(body.get("data") or {})
            for k, v in (body.pop("stringData", None) or {}).items():
                data[k] = base64.b64encode(v.encode()).decode()
            body["data"] = data
            body["metadata"].update(namespace=ns, resourceVersion=self._next_rv())
            self.secrets[(ns, body_name)] = body
            return JSONResponse(body, status_code=201 if request.method == "POST" else 200)

        base = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
        return Starlette(
            routes=[
                Route("/api/v1/namespaces", namespaces, methods=["POST"]),
                Route("/api/v1/namespaces/{name}", namespace, methods=["GET"]),
                Route("/api/v1/namespaces/{namespace}/secrets", secrets, methods=["POST"]),
                Route(
                    "/api/v1/namespaces/{namespace}/secrets/{name}",
                    secrets,
                    methods=["GET", "PUT", "DELETE"],
                ),
                Route(base, collection, methods=["GET", "POST"]),
                Route(base + "/{name}", item, methods=["GET", "PATCH", "DELETE"]),
            ]
        )

    async def _create(
        self, request: Request, group: str, version: str, ns: str, plural: str
    ) -> Response:
        if ns not in self.namespaces:
            return _status(404, "NotFound", f'namespaces "{ns}" not found', name=ns)
        try:
            body = await request.json()
            name = body["metadata"]["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return _status(400, "BadRequest", "the object has no metadata.name")
        key = (group, version, ns, plural, name)
        if key in self.objects:
            return _status(
                409,
                "AlreadyExists",
                f'{plural}.{group} "{name}" already exists',
                name=name,
                group=group,
                kind=plural,
            )
        body["metadata"].update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            resourceVersion=self._next_rv(),
            generation=1,
            creationTimestamp=_now(),
        )
        self.objects[key] = body
        await self._record(key, "ADDED")
        if plural in SERVING_KINDS or plural == MCP_SERVERS:
            reconcile = self._reconcile_mcp if plural == MCP_SERVERS else self._reconcile
            task = asyncio.create_task(reconcile(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return JSONResponse(body, status_code=201)

    async def _watch(
        self, where: tuple[str, str, str, str], name: str | None, since: int, seconds: float
    ) -> AsyncIterator[bytes]:
        deadline = asyncio.get_running_loop().time() + seconds
        seen = since
        while True:
            changed = self._changed  # taken before reading the log: nothing slips between
            for rv, at, kind, obj in list(self._log):
                if rv <= seen or at != where:
                    continue
                seen = rv
                if name is not None and obj["metadata"]["name"] != name:
                    continue
                yield (json.dumps({"type": kind, "object": obj}) + "\n").encode()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or self.down:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
