"""The pages' HTTP side, straight and through nginx: a strict Content-Security-Policy, pages
revalidated on every visit, their files cached for good under a digest URL, 304 for what
the browser has, nothing served that is not on the list."""

from __future__ import annotations

import re

import pytest

from stockade.runner.local import Client, NginxProcess, RunnerProcess, request


@pytest.fixture(params=["direct", "nginx"])
def server(request: pytest.FixtureRequest, runner: RunnerProcess) -> Client:
    if request.param == "nginx":
        return request.getfixturevalue("nginx")  # type: ignore[no-any-return]
    return runner


def test_the_playground_page_has_a_strict_policy_and_is_revalidated(server: Client) -> None:
    page = server.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy, directive
    assert "unsafe" not in policy
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["x-content-type-options"] == "nosniff"
    again = request(server.port, "GET", "/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status == 304 and again.body == b""


def test_the_pages_files_are_cached_for_good_under_their_digest(server: Client) -> None:
    page = server.get("/").body.decode()
    links = re.findall(r'(?:src|href)="(/static/[^"?]+)\?v=([0-9a-f]+)"', page)
    assert {path for path, _ in links} == {"/static/playground.js", "/static/playground.css",
                                           "/static/favicon.svg"}
    for path, digest in links:
        pinned = server.get(f"{path}?v={digest}")
        assert pinned.status == 200
        assert pinned.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert pinned.headers["etag"] == f'"{digest}"'
        assert server.get(f"{path}?v=stale").headers["cache-control"] == "no-cache"


def test_the_docs_page_links_the_vendored_swagger_ui(server: Client) -> None:
    page = server.get("/docs")
    assert page.status == 200
    bundle = re.search(r'src="(/static/vendor/swagger-ui/swagger-ui-bundle\.js\?v=\w+)"',
                       page.body.decode())
    assert bundle is not None, page.body[:500]
    script = server.get(bundle.group(1))
    assert script.status == 200 and len(script.body) > 100_000
    assert script.headers["content-type"].startswith("text/javascript")
    assert "script-src 'self'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("path", ["/static/../keys.json", "/static/vendor.json",
                                  "/static/vendor/swagger-ui/LICENSE", "/static/nope.js"])
def test_nothing_off_the_list_is_served(server: Client, path: str) -> None:
    assert server.get(path).status == 404


def test_nginx_compresses_the_large_files(nginx: NginxProcess) -> None:
    page = nginx.get("/docs").body.decode()
    bundle = re.search(r'src="(/static/vendor/swagger-ui/swagger-ui-bundle\.js\?v=\w+)"', page)
    assert bundle is not None
    squeezed = request(nginx.port, "GET", bundle.group(1), headers={"Accept-Encoding": "gzip"})
    assert squeezed.headers.get("content-encoding") == "gzip"
    assert len(squeezed.body) < 1_000_000
