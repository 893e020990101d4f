"""The console looks as it did: every view of a fresh world, at 1024 and 1440 px, is compared
pixel by pixel (in Chromium itself) with its last accepted screenshot in
``tests/console/baselines/``. What differs by data (tables, charts, times, ids, the signed-in
name) is masked; up to ``TOLERANCE`` of the pixels may differ (a count, a longer word), while a
layout or style regression moves far more. ``STEWARD_UPDATE_SCREENSHOTS=1`` accepts the current
look; a failure leaves the new screenshot and a diff image (changed pixels in red) in the
artefacts."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from tests.console.conftest import Stack
from tests.console.support import console_page

BASELINES = Path(__file__).parent / "baselines"
TOLERANCE = 0.01
QUIET_MS = 400
UPDATE = os.environ.get("STEWARD_UPDATE_SCREENSHOTS") == "1"
# What a fresh world still fills in differently from run to run: tables, times and dates, code
# (keys, ids), charts, the signed-in key's id, and the toasts that come and go.
MASKED = (
    "main table, main time, main code, main pre, main canvas, main svg,"
    " main input[type=date], .who-cred, #toasts, #audit-verify"
)
# Status lines whose text (so whose height) depends on timing, e.g. whether the audit chain's
# first checkpoint is signed yet: held to one height, so that nothing below them moves.
CLAMPED = """
() => { for (const el of document.querySelectorAll("#audit-verify")) {
  el.style.height = "3rem"; el.style.overflow = "hidden";
} }
"""

# Two PNG data URLs in, the share of pixels that differ (beyond anti-aliasing) and a diff image
# out; run on a blank page, where no CSP stands in the way of data: images.
COMPARE = """
async ([before, after]) => {
  const load = (src) => new Promise((resolve, reject) => {
    const img = new Image(); img.onload = () => resolve(img); img.onerror = reject; img.src = src;
  });
  const [a, b] = await Promise.all([load(before), load(after)]);
  if (a.width !== b.width || a.height !== b.height) {
    return {size: `${a.width}x${a.height} then ${b.width}x${b.height}`, share: 1};
  }
  const pixels = (img) => {
    const canvas = document.createElement("canvas");
    canvas.width = img.width; canvas.height = img.height;
    const g = canvas.getContext("2d"); g.drawImage(img, 0, 0);
    return [canvas, g.getImageData(0, 0, img.width, img.height).data];
  };
  const [canvas, pa] = pixels(a); const [, pb] = pixels(b);
  const g = canvas.getContext("2d");
  const diff = g.createImageData(a.width, a.height);
  let differ = 0;
  for (let i = 0; i < pa.length; i += 4) {
    const d = Math.abs(pa[i] - pb[i]) + Math.abs(pa[i + 1] - pb[i + 1])
      + Math.abs(pa[i + 2] - pb[i + 2]);
    if (d > 48) { differ++; diff.data[i] = 255; diff.data[i + 3] = 255; }
    else { diff.data[i] = diff.data[i + 1] = diff.data[i + 2] = pa[i]; diff.data[i + 3] = 60; }
  }
  g.putImageData(diff, 0, 0);
  return {share: differ / (pa.length / 4), diff: canvas.toDataURL("image/png")};
}
"""


# Resolves once the view has not changed for QUIET_MS (a MutationObserver on <main>).
SETTLED = """
() => new Promise((resolve) => {
  const main = document.querySelector("main");
  let timer;
  const quiet = () => { clearTimeout(timer); timer = setTimeout(done, QUIET); };
  const observer = new MutationObserver(quiet);
  function done() { observer.disconnect(); resolve(); }
  observer.observe(main, {subtree: true, childList: true, characterData: true});
  quiet();
})
""".replace("QUIET", str(QUIET_MS))


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize("width", [1024, 1440])
async def test_every_view_looks_as_it_did(
    browser: Any, stack: Stack, admin_key: str, artifacts: Path, width: int
) -> None:
    admin = await console_page(browser, stack.url, artifacts)
    page = admin.page
    await page.set_viewport_size({"width": width, "height": 900})

    async def shot() -> bytes:
        await page.wait_for_load_state("networkidle")
        # The view has settled: every section has replaced its "Loading…" with what it loaded
        # (or the error it got), and nothing in it has changed for a while.
        await page.evaluate(SETTLED)
        await expect(page.locator("main .loading")).to_have_count(0)
        await page.evaluate(CLAMPED)
        png: bytes = await page.screenshot(
            animations="disabled", caret="hide", mask=[page.locator(MASKED)]
        )
        return png

    await admin.open()
    await page.get_by_label("API key").wait_for()
    shots = {"sign-in": await shot()}
    await admin.sign_in(admin_key)
    links = await page.locator("#nav a").evaluate_all("(as) => as.map((a) => a.hash)")
    for hash_ in links:
        view = hash_.removeprefix("#/")
        await admin.go(view)
        shots[view] = await shot()
    admin.assert_clean()

    blank = await page.context.new_page()
    changed: list[str] = []
    missing: list[str] = []
    for view, png in shots.items():
        name = f"{view}-{width}.png"
        baseline = BASELINES / name
        if UPDATE:
            baseline.write_bytes(png)
            continue
        if not baseline.exists():
            missing.append(name)
            (artifacts / f"new-{name}").write_bytes(png)
            continue
        result = await blank.evaluate(COMPARE, [data_url(baseline.read_bytes()), data_url(png)])
        if result["share"] > TOLERANCE:
            (artifacts / f"new-{name}").write_bytes(png)
            if "diff" in result:
                encoded = result["diff"].split(",", 1)[1]
                (artifacts / f"diff-{name}").write_bytes(base64.b64decode(encoded))
            changed.append(f"{name}: {result.get('size') or format(result['share'], '.2%')}")
    assert not missing, f"no baseline for {missing}: STEWARD_UPDATE_SCREENSHOTS=1 records them"
    assert not changed, f"the console looks different (artefacts: new-*, diff-*): {changed}"
