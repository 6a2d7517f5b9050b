"""The web page of `imgclf serve`, in headless Chromium against a real uvicorn
server on loopback: pick an image, see its predicted label as bars."""

from __future__ import annotations

import pytest

from .browser import browser_page, chromium_path
from .servers import running_server
from .test_export import export_once, val_images


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    chromium_path()  # skip before starting anything where Chromium is missing
    model = export_once(tiny_run, tmp_path_factory)[0]
    with running_server(model, tmp_path_factory.mktemp("serve") / "server.log") as (url, _):
        yield url


def test_page_upload_shows_label(server, tiny):
    cat, dog = val_images(tiny, 1)["cats"][0], val_images(tiny, 1)["dogs"][0]
    with browser_page() as page:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        console: list[str] = []  # a Content-Security-Policy that does not match the page reports here
        page.on("console", lambda m: console.append(m.text))
        resp = page.goto(server + "/")
        h = resp.headers
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert "script-src 'self'" in h["content-security-policy"]
        # locators, not wait_for_function: Playwright evaluates a string predicate, which the page's CSP refuses
        page.locator("#model-info", has_text="2 classes").wait_for()
        page.set_input_files("#file", [str(cat)])
        card = page.locator("#results .card").first
        card.locator(".bar").first.wait_for(timeout=20_000)
        assert card.locator(".label").inner_text() == "cats"
        assert card.locator(".bar .cls").first.inner_text() == "cats"
        page.set_input_files("#file", [str(dog)])
        page.locator("#results .card .bar").nth(3).wait_for(timeout=20_000)
        assert page.locator("#results .card").first.locator(".label").inner_text() == "dogs"
        assert "done" in page.locator("#status").inner_text()
        # the policy is enforced: a script the page did not ship is refused
        page.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                      " document.body.appendChild(s); }")
        assert page.evaluate("() => window.injected") is None
    assert not [m for m in console if "Content Security Policy" in m and "injected" not in m
                and "inline script" not in m], console
    # Every asset came from this server: nothing from a CDN.
    assert requests and all(u.startswith(server) or u.startswith("blob:") for u in requests), requests


def test_api_docs_render_offline(server):
    """/docs is Swagger UI from files the server holds: it renders every route
    with no request leaving the server (this machine has no CDN to reach)."""
    with browser_page() as page:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        resp = page.goto(server + "/docs")
        assert resp.headers["x-frame-options"] == "DENY" and resp.headers["x-content-type-options"] == "nosniff"
        page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
        assert "imgclf" in page.inner_text(".swagger-ui .info .title")
        paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.innerText)")
        assert {"/v1/predict", "/v1/model", "/metrics"} <= {p.replace("\u200b", "") for p in paths}
    assert requests and all(u.startswith(server) or u.startswith("data:") for u in requests), requests
