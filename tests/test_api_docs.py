"""The API docs work offline: Swagger UI and Redoc come from our own static files (drf-spectacular-sidecar), and a
real headless Chromium, driven over WebDriver by Debian's chromedriver, renders them from the live server and lists
the operations, with every resource it loaded served by us."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from django.contrib.auth.models import User
from django.test import Client

from tests.support.ports import free_port

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


class WebDriver:
    """The few W3C WebDriver commands this test needs, over HTTP with the standard library."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        capabilities = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"}, "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2000"],
        }}  # fmt: skip
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["sessionId"]

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["value"]

    def go(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def add_cookie(self, name: str, value: str) -> None:
        self.call("POST", f"/session/{self.session}/cookie", {"cookie": {"name": name, "value": value, "path": "/"}})

    def run(self, script: str):
        return self.call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []})

    def wait_for(self, script: str, timeout_s: float = 30):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if value := self.run(script):
                return value
            time.sleep(0.25)
        raise AssertionError(f"nothing from {script!r} after {timeout_s} s; page text: {self.run(PAGE_TEXT)[:2000]}")

    def console(self) -> list[str]:
        return [entry["message"] for entry in self.call("POST", f"/session/{self.session}/se/log", {"type": "browser"})]

    def quit(self) -> None:
        self.call("DELETE", f"/session/{self.session}")


PAGE_TEXT = "return document.body ? document.body.innerText : ''"
RESOURCES = "return performance.getEntriesByType('resource').map(entry => entry.name)"


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (deploy/bootstrap.sh installs the Debian packages "
                    "chromium and chromium-driver; make test runs it)")  # fmt: skip
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        session = WebDriver(port)
        yield session
        session.quit()
    finally:
        driver.terminate()
        driver.wait(10)


@pytest.fixture
def signed_in(live_server, browser) -> WebDriver:
    """The browser with a signed-in user's session cookie, as after the admin's login page."""
    client = Client()
    client.force_login(User.objects.create_user("reader", password="x" * 12))
    browser.go(f"{live_server.url}/healthz")
    browser.add_cookie("sessionid", client.cookies["sessionid"].value)
    return browser


def assert_served_by_us(browser: WebDriver, live_server) -> None:
    """Every resource the page loaded came from the live server; any other it asked for, its Content Security
    Policy blocked before a request left the browser (Chromium says so on the console)."""
    loaded = browser.run(RESOURCES)
    assert any(url.startswith(f"{live_server.url}/static/drf_spectacular_sidecar/") for url in loaded), loaded
    console = browser.console()
    for url in loaded:
        if not url.startswith(live_server.url):
            assert any(url in line and "Content Security Policy" in line for line in console), (url, console)


def test_swagger_ui_lists_the_operations_from_our_own_static_files(signed_in, live_server):
    signed_in.go(f"{live_server.url}/api/v1/docs/")
    paths = signed_in.wait_for(
        "return Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.innerText.trim())"
    )
    assert {"/api/v1/runs/", "/api/v1/runs/{id}/cancel/", "/api/v1/datasets/", "/api/v1/episodes/{id}/steps/"} <= set(
        paths
    )
    assert "MegaFlow API" in signed_in.run(PAGE_TEXT)
    assert_served_by_us(signed_in, live_server)


def test_redoc_lists_the_operations_from_our_own_static_files(signed_in, live_server):
    signed_in.go(f"{live_server.url}/api/v1/redoc/")
    text = signed_in.wait_for(
        "const t = document.body.innerText; return t.includes('/api/v1/runs/{id}/cancel/') ? t : ''"
    )
    assert "/api/v1/datasets/" in text and "/api/v1/episodes/{id}/steps/" in text
    assert_served_by_us(signed_in, live_server)
