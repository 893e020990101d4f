"""Steward's quota plugin for real Kong (gateway/kong/steward_quota.py) under the real kong-pdk
plugin server, started with the kong.conf lines of the plugin's docstring and driven over its
unix socket as Kong drives it (tests/gateway/kong_harness.py); usage goes to a real HTTP server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.kong import steward_quota
from gateway.kong.schema import StewardQuotaConfig
from libs.common.events.usage import UsageRecorded
from tests.gateway.kong_harness import PDK, Call, Kong, PluginServer, RpcError, plugin_server

with warnings.catch_warnings():  # kong_pdk's const.py calls the deprecated getdefaultlocale
    warnings.simplefilter("ignore", DeprecationWarning)
    from kong_pdk.module import phases as PDK_PHASES
    from kong_pdk.pdk.kong import kong as kong_pdk_stubs

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "steward-quota"
KONG_PREFIX = "/usr/local/kong"
API_KEY = f"usage-key-{uuid.uuid4().hex}"
# The kong.conf the plugin documents: what an operator copies, so what the tests run.
KONG_CONF = dict(re.findall(r"^\s*(\w+) = (.+)$", steward_quota.__doc__ or "", re.M))
SERVER = "pluginserver_" + KONG_CONF["pluginserver_names"].replace("-", "_")


def kong_conf_command(key: str, prefix: Path) -> list[str]:
    """A kong.conf command line, with this Python and a temporary Kong prefix."""
    argv = shlex.split(KONG_CONF[f"{SERVER}_{key}"].replace(KONG_PREFIX, str(prefix)))
    assert argv[0] == "python3"
    return [sys.executable, *argv[1:]]


class UsageReceiver:
    """Stands in for the gateway admin's ``POST /steward/usage``: keeps what each post carried."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], Any]] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.changed:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.posts.append((headers, json.loads(body)))
                    receiver.changed.notify_all()
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/steward/usage"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def for_project(self, project: str, timeout: float = 10) -> tuple[dict[str, str], Any]:
        """The first post of ``project``'s usage (the timeout only bounds a failure)."""

        def found() -> tuple[dict[str, str], Any] | None:
            return next((p for p in self.posts if p[1][0]["project"] == project), None)

        with self.changed:
            post = self.changed.wait_for(found, timeout)
        assert post is not None, f"no usage for {project} reached {self.url}"
        return post


@pytest.fixture(scope="module")
def receiver() -> Iterator[UsageReceiver]:
    receiver = UsageReceiver()
    yield receiver
    receiver.http.shutdown()
    receiver.http.server_close()


def start_server(prefix: Path, *extra: str) -> AbstractContextManager[PluginServer]:
    """The plugin server started as kong.conf's start_cmd starts it, with the usage key set."""
    env = os.environ | {"STEWARD_USAGE_API_KEY": API_KEY, "NO_PROXY": "127.0.0.1"}
    socket_path = Path(KONG_CONF[f"{SERVER}_socket"].replace(KONG_PREFIX, str(prefix)))
    argv = [*kong_conf_command("start_cmd", prefix), *extra]
    return plugin_server(argv, socket_path, ROOT, env, prefix / "pluginserver.log")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServer]:
    with start_server(tmp_path_factory.mktemp("kong")) as server:
        yield server


@pytest.fixture
def kong(server: PluginServer) -> Iterator[Kong]:
    kong = Kong(server, PLUGIN)
    yield kong
    kong.close()


def chat(project: str, content: str, usage: dict[str, int] | None = None) -> Call:
    """A call of ``project``'s key to model-echo, whose upstream answers ``content``."""
    answer: dict[str, Any] = {"choices": [{"index": 0, "message": {"content": content}}]}
    if usage is not None:
        answer["usage"] = usage
    consumer = {"id": str(uuid.uuid4()), "username": project, "custom_id": project}
    return Call(
        consumer=consumer,
        credential={"id": f"cred-{project}", "consumer": {"id": consumer["id"]}},
        service={"id": str(uuid.uuid4()), "name": "model-echo", "protocol": "http"},
        upstream_body=json.dumps(answer).encode(),
    )


def project() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


# -- the fake Kong against the real protocol ------------------------------------------------


def test_kong_sees_the_plugin_as_the_server_describes_it(kong: Kong, tmp_path: Path) -> None:
    """The query_cmd (what Kong reads at start) and GetPluginInfo agree with the module."""
    dumped = subprocess.run(  # noqa: S603 - the plugin's documented query_cmd
        kong_conf_command("query_cmd", tmp_path), cwd=ROOT, capture_output=True, check=True
    )
    [info] = json.loads(dumped.stdout)  # process.lua: a JSON array, one plugin per server
    assert info == kong.info
    assert KONG_CONF["plugins"].split(",") == ["bundled", PLUGIN] and info["Name"] == PLUGIN
    assert info["Priority"] == steward_quota.priority
    assert info["Version"] == steward_quota.version
    assert info["Phases"] == [p for p in PDK_PHASES if hasattr(steward_quota.Plugin, p)]
    assert info["Phases"] == ["access", "response"]
    config = info["Schema"]["fields"][0]["config"]
    assert config["type"] == "record" and config["fields"] == list(steward_quota.Schema)
    # Every field the export (gateway/kong/schema.py) may write is one Kong's schema accepts.
    assert {name for f in config["fields"] for name in f} == set(StewardQuotaConfig.model_fields)


def test_the_fake_kong_speaks_the_messages_kong_sends(kong: Kong) -> None:
    """Message shapes as mp_rpc.lua sends them, and PDK functions that exist in Kong's PDK."""
    instance = kong.start_instance({"tokens_per_day": 1000})
    _, _, method, [start] = kong.rpc.sent[-1]
    assert method == "plugin.StartInstance" and start["Name"] == PLUGIN
    assert set(start) == {"Name", "Config"} and isinstance(start["Config"], str)  # JSON text
    status = kong.rpc.call("plugin.GetStatus")
    [running] = [i for i in status["Plugins"][PLUGIN]["Instances"] if i["Id"] == instance]
    config = running["Config"]
    assert config["tokens_per_day"] == 1000 and config["estimate_when_missing"] is True
    assert config["project"] is None  # an unset field is null, as Kong sends it

    call = kong.proxy(instance, chat(project(), "hi", {"prompt_tokens": 1, "completion_tokens": 1}))
    handle = [m for m in kong.rpc.sent if m[2] == "plugin.HandleEvent"]
    assert [m[3] for m in handle[-2:]] == [
        [{"InstanceId": instance, "EventName": "access"}],
        [{"InstanceId": instance, "EventName": "response"}],
    ]
    steps = [(m[2], sorted(m[3][0])) for m in kong.rpc.sent if m[2].startswith("plugin.Step")]
    assert ("plugin.StepConsumer", ["Data", "EventId"]) in steps  # typed, per mp_rpc.lua
    assert ("plugin.Step", ["EventId"]) in steps  # a nil answer carries no Data
    assert list(call.events) == ["access", "response"]
    # Every PDK function the fake answers is one of Kong's (kong_pdk's stubs of Kong's PDK).
    for method in PDK:
        target: Any = kong_pdk_stubs
        for part in method.split(".")[1:]:
            target = getattr(target, part)
        assert callable(target), method


# -- the plugin ------------------------------------------------------------------------------


def test_a_call_under_budget_goes_through(kong: Kong) -> None:
    instance = kong.start_instance({"tokens_per_day": 1000})
    call = kong.proxy(
        instance, chat(project(), "hello", {"prompt_tokens": 3, "completion_tokens": 2})
    )
    assert call.exit is None
    assert ("access", "kong.service.request.enable_buffering") in call.pdk_calls
    assert isinstance(call.shared["steward_started"], float)
    assert list(call.events) == ["access", "response"] and not call.logs


def test_upstream_usage_is_sent_and_spends_the_budget(kong: Kong, receiver: UsageReceiver) -> None:
    who = project()
    instance = kong.start_instance({"tokens_per_day": 10, "usage_url": receiver.url})
    first = kong.proxy(instance, chat(who, "hello", {"prompt_tokens": 7, "completion_tokens": 5}))
    assert first.exit is None and not first.logs

    headers, [payload] = receiver.for_project(who)
    assert headers["apikey"] == API_KEY
    assert headers["content-type"] == "application/json"
    UsageRecorded.model_validate(payload)  # what POST /steward/usage takes in
    assert payload["credential_id"] == f"cred-{who}" and payload["model"] == "model-echo"
    tokens = [payload[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    assert tokens == [7, 5, 12]
    assert payload["usage_source"] == "upstream"
    assert (payload["http_status"], payload["status"]) == (200, "ok")

    refused = kong.proxy(instance, chat(who, "again"))
    assert refused.exit is not None and refused.exit.status == 429
    assert refused.exit.body == {"message": "Token quota exceeded"}
    retry = int(refused.exit.headers["Retry-After"])
    assert 1 <= retry <= 86400  # the day window
    assert refused.exit.headers == {
        "Retry-After": str(retry),
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(retry),
    }
    assert list(refused.events) == ["access"]  # never proxied, so no response phase

    other = kong.proxy(instance, chat(project(), "hi"))  # another project's budget is its own
    assert other.exit is None


def test_an_answer_without_usage_is_estimated_and_counted(
    kong: Kong, receiver: UsageReceiver
) -> None:
    who = project()
    instance = kong.start_instance({"tokens_per_day": 2, "usage_url": receiver.url})
    assert kong.proxy(instance, chat(who, "abcdefgh")).exit is None  # 8 characters: 2 tokens
    _, [payload] = receiver.for_project(who)
    assert payload["usage_source"] == "estimated"
    assert (payload["prompt_tokens"], payload["completion_tokens"]) == (0, 2)
    refused = kong.proxy(instance, chat(who, "more"))
    assert refused.exit is not None and refused.exit.status == 429


def test_a_refusal_leaves_no_event_in_the_plugin_server(kong: Kong) -> None:
    """Kong sends nothing after an exit, so the server must forget that event itself (kong-pdk
    does only when the exit is not the event's first message)."""
    instance = kong.start_instance({"project": project(), "tokens_per_day": 1})
    kong.proxy(instance, chat("ignored", "x", {"prompt_tokens": 1, "completion_tokens": 0}))
    refused = kong.proxy(instance, chat("ignored", "y"))
    assert refused.exit is not None and refused.exit.status == 429
    with pytest.raises(RpcError, match="not found"):
        kong.rpc.call("plugin.Step", {"EventId": refused.events["access"]})


def test_a_failing_pdk_call_is_logged_and_the_call_goes_on(
    kong: Kong, receiver: UsageReceiver
) -> None:
    """A phase that raised would leave Kong waiting on the server until its socket timeout."""
    instance = kong.start_instance({"tokens_per_day": 1000, "usage_url": receiver.url})
    call = chat(project(), "hi", {"prompt_tokens": 1, "completion_tokens": 1})
    call.failing["kong.router.get_service"] = "no service in this context"
    kong.proxy(instance, call)
    assert call.exit is None and list(call.events) == ["access", "response"]
    [(level, [message])] = call.logs
    assert level == "err" and "no service in this context" in message


def test_a_bad_usage_url_does_not_stop_usage_of_other_routes(
    kong: Kong, receiver: UsageReceiver
) -> None:
    # An unexpanded variable: urllib raises InvalidURL, not an OSError, for the port.
    broken = kong.start_instance({"usage_url": "http://gateway-admin:${ADMIN_PORT}/steward/usage"})
    kong.proxy(broken, chat(project(), "hi", {"prompt_tokens": 1, "completion_tokens": 1}))
    who = project()
    working = kong.start_instance({"usage_url": receiver.url})
    kong.proxy(working, chat(who, "hi", {"prompt_tokens": 2, "completion_tokens": 3}))
    _, [payload] = receiver.for_project(who)
    assert payload["total_tokens"] == 5


def test_python_style_return_values_work_too(
    tmp_path_factory: pytest.TempPathFactory, receiver: UsageReceiver
) -> None:
    """``--no-lua-style``: PDK calls return plain data (kong-pdk's announced next default)."""
    with start_server(tmp_path_factory.mktemp("kong"), "--no-lua-style") as server:
        kong = Kong(server, PLUGIN)
        try:
            who = project()
            instance = kong.start_instance({"tokens_per_day": 5, "usage_url": receiver.url})
            usage = {"prompt_tokens": 4, "completion_tokens": 1}
            assert kong.proxy(instance, chat(who, "hello", usage)).exit is None
            _, [payload] = receiver.for_project(who)
            assert payload["credential_id"] == f"cred-{who}" and payload["total_tokens"] == 5
            refused = kong.proxy(instance, chat(who, "again"))
            assert refused.exit is not None and refused.exit.status == 429
        finally:
            kong.close()
