"""Fast checks of the console's files that need no browser: every module parses, nothing writes
markup from data, the action table and the cost formula match the Python ones, and the gateway
serves the repository's console by default."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from libs.common.auth import ACTIONS
from libs.common.events.approval import CostSecurityPlan
from libs.common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "console"
SCRIPTS = sorted(CONSOLE.rglob("*.js"))
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def run_module(source: str, stdin: str = "") -> Any:
    """Run ES module code with node; it prints one JSON value."""
    assert NODE is not None
    done = subprocess.run(  # noqa: S603 - our own script
        [NODE, "--input-type=module", "-e", source],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_console_has_its_views() -> None:
    names = {p.name for p in (CONSOLE / "js" / "views").glob("*.js")}
    assert {
        "catalog.js",
        "request.js",
        "queue.js",
        "endpoints.js",
        "usage.js",
        "audit.js",
        "keys.js",
        "start.js",
        "mcp.js",
    } <= names


@needs_node
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(CONSOLE)))
def test_every_module_parses(script: Path) -> None:
    # `node --check file.js` would parse as CommonJS and pass anything; check as a module.
    assert NODE is not None
    done = subprocess.run(  # noqa: S603
        [NODE, "--input-type=module", "--check"],
        stdin=script.open(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# Every way of turning a string into markup or code. The console builds the DOM with
# createElement/textContent only, so none of these may appear at all.
MARKUP_SINKS = re.compile(
    r"\.innerHTML\b|\.outerHTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function\("
    r"|createContextualFragment|DOMParser|srcdoc"
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(CONSOLE)))
def test_no_module_writes_markup_from_strings(script: Path) -> None:
    code = "\n".join(
        line for line in script.read_text().splitlines() if not line.strip().startswith("//")
    )
    assert not MARKUP_SINKS.findall(code)


def test_setattribute_of_urls_and_handlers_goes_through_the_guard() -> None:
    dom = (CONSOLE / "js" / "dom.js").read_text()
    assert 'URL_ATTRS = new Set(["href", "src", "action", "formaction", "xlink:href"])' in dom
    assert "safeUrl(String(value))" in dom
    # No view sets attributes directly (h()/s() are the only way, and they check).
    for script in (CONSOLE / "js" / "views").glob("*.js"):
        assert ".setAttribute(" not in script.read_text(), script.name


def test_credentials_stay_in_session_storage() -> None:
    for script in SCRIPTS:
        code = "\n".join(
            line for line in script.read_text().splitlines() if not line.strip().startswith("//")
        )
        assert "localStorage" not in code, script.name
        assert "document.cookie" not in code, script.name


def test_the_action_table_is_the_python_one() -> None:
    copied = json.loads((CONSOLE / "actions.json").read_text())
    expected = {a: {"role": r.min_role.value, "scope": r.scope} for a, r in ACTIONS.items()}
    assert copied == expected, "regenerate console/actions.json from libs/common/auth.py ACTIONS"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_the_page_loads_nothing_from_elsewhere_and_has_a_strict_policy() -> None:
    parser = _Tags()
    parser.feed((CONSOLE / "index.html").read_text())
    for tag, attrs in parser.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"^(https?:)?//", value), f"<{tag} {name}={value}>"
        if tag in ("input", "select", "textarea"):
            assert attrs.get("id") or attrs.get("aria-label"), f"unlabelled <{tag}>"
        if tag == "script":
            assert attrs.get("src"), "no inline script"
    policy = next(
        a["content"] or ""
        for t, a in parser.tags
        if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    )
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    css = (CONSOLE / "styles.css").read_text()
    assert "@import" not in css
    assert "url(" not in css


@needs_node
def test_the_live_estimate_uses_the_plan_formula() -> None:
    cases = [
        {"gpus": g, "replicas": r, "hours": h, "gpu_hour_rate": rate}
        for g, r, h, rate in product(
            [0, 1, 2, 3, 8], [1, 2, 3, 7], [0.5, 1, 2.5, 24, 33.333, 0.125], [0, 0.125, 1.1, 2.675]
        )
    ]
    url = (CONSOLE / "js" / "cost.js").as_uri()
    source = (
        f"import {{ planCost }} from {json.dumps(url)};"
        "let input = ''; for await (const chunk of process.stdin) input += chunk;"
        "console.log(JSON.stringify(JSON.parse(input).map(planCost)));"
    )
    got = run_module(source, json.dumps(cases))
    for case, answer in zip(cases, got, strict=True):
        plan = CostSecurityPlan(**case, data_classification="internal", network_exposure="project")
        assert answer == {"gpu_hours": plan.gpu_hours, "estimated_cost": plan.estimated_cost}, case


@needs_node
def test_the_queue_puts_overdue_requests_first() -> None:
    url = (CONSOLE / "js" / "views" / "queue.js").as_uri()
    source = f"""
      globalThis.window = {{ location: {{ href: "http://x/" }} }};
      const {{ queueOrder, slaText }} = await import({json.dumps(url)});
      const now = Date.parse("2030-01-10T00:00:00Z");
      const items = [
        {{ id: "later", due_at: "2030-01-14T00:00:00Z" }},
        {{ id: "overdue-1h", due_at: "2030-01-09T23:00:00Z" }},
        {{ id: "soon", due_at: "2030-01-10T02:00:00Z" }},
        {{ id: "overdue-2d", due_at: "2030-01-08T00:00:00Z" }},
      ];
      console.log(JSON.stringify({{
        order: queueOrder(items, now).map((r) => r.id),
        clocks: items.map((r) => slaText(r, now)),
      }}));
    """
    got = run_module(source)
    assert got["order"] == ["overdue-2d", "overdue-1h", "soon", "later"]
    assert got["clocks"] == [
        {"text": "4 d 0 h left", "overdue": False},
        {"text": "overdue by 1 h 0 min", "overdue": True},
        {"text": "2 h 0 min left", "overdue": False},
        {"text": "overdue by 2 d 0 h", "overdue": True},
    ]


def test_the_gateway_serves_the_repository_console_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STEWARD_GATEWAY_CONSOLE_DIR", raising=False)
    directory = Settings().gateway_console_dir
    assert directory is not None
    assert (directory / "index.html").is_file()
    assert directory.resolve() == CONSOLE.resolve()
