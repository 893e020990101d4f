"""Helpers for driving the console in Chromium: pages that fail on script errors and CSP
violations, sign-in, navigation, screenshots, and the accessibility sweep."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.console.conftest import VIEWPORT

# Every form control in the page must have an accessible name: a <label for>, a wrapping
# label, aria-label or aria-labelledby.
UNLABELLED_CONTROLS = """
() => [...document.querySelectorAll('input, select, textarea')]
  .filter((el) => el.type !== 'hidden')
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !el.getAttribute('aria-labelledby'))
  .map((el) => el.outerHTML.slice(0, 120))
"""


@dataclass
class Console:
    page: Any
    base: str
    artifacts: Path
    problems: list[str] = field(default_factory=list)

    async def open(self, route: str = "") -> None:
        await self.page.goto(f"{self.base}/console/{'#/' + route if route else ''}")

    async def sign_in(self, key: str) -> None:
        await self.open()
        await self.page.get_by_label("API key").fill(key)
        await self.page.get_by_role("button", name="Sign in").click()
        await self.page.locator("#who-name").wait_for()

    async def go(self, route: str) -> None:
        """Follow the navigation link of a view (by its id: "catalog", "queue"…)."""
        await self.page.locator(f'#nav a[href="#/{route}"]').click()
        await self.page.locator("main h1").first.wait_for()

    async def reload_until(self, route: str, selector: str, text: str, tries: int = 60) -> None:
        """Show ``route`` again until ``selector`` holds ``text`` (events travel through NATS,
        as a person would reload)."""
        for _ in range(tries):
            await self.go(route)
            target = self.page.locator(selector)
            await target.first.wait_for(state="attached")
            if text in await target.first.text_content():
                return
            await self.page.wait_for_timeout(250)
        raise AssertionError(f"{text!r} never showed in {selector} of {route}")

    async def shot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def unlabelled(self) -> list[str]:
        found: list[str] = await self.page.evaluate(UNLABELLED_CONTROLS)
        return found

    def assert_clean(self) -> None:
        assert not self.problems, self.problems


async def console_page(browser: Any, base: str, artifacts: Path) -> Console:
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    console = Console(page=page, base=base, artifacts=artifacts)
    page.on("pageerror", lambda error: console.problems.append(f"page error: {error}"))

    def on_message(message: Any) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            console.problems.append(f"CSP: {message.text}")

    page.on("console", on_message)
    return console
