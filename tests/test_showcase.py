"""The showcase, examples/notes.lua: a notes board on SQLite through a Lua C module (LuaSQL),
with sessions, CSRF tokens, escaping and a JSON endpoint.

End to end in a real headless Chromium (Debian's, driven by Playwright) through a private
nginx and luafcgid; then over plain HTTP: the CSRF refusal, the length limit, and the page
on Lua 5.4, 5.1 and LuaJIT with its persistent SQLite connection and its reconnect.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from tests.showcase_client import FORM, Visitor, sqlite_driver_missing
from tests.support import Site, http

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("notes.lua", "notes_db.lua")
CHROMIUM = "/usr/bin/chromium"
RUNTIMES = ["5.4", "5.1", "luajit"]


def need_driver(lua: str = "5.4") -> None:
    reason = sqlite_driver_missing(lua)
    if reason:
        pytest.skip(reason)


def notes_site(base: Path, **settings: object) -> Site:
    """The example's two files served by luafcgid behind nginx, its database in ``base``."""
    scripts = {name: (EXAMPLES / name).read_text() for name in SCRIPTS}
    return Site(base, scripts, SessionCookieSecure=False,
                Config={"notes_db": str(base / "notes.db"), "site_name": "showcase test"},
                **settings)


# --- the site every test of this module shares (Lua 5.4, two processes) ---------------------


@pytest.fixture(scope="module")
def running_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_driver()
    with notes_site(tmp_path_factory.mktemp("showcase"), processes=2, workers=2) as web:
        yield web


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright, "
        "or the test extra: pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        # Debian's Chromium, not a browser Playwright downloads (`playwright install`)
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


# --- in the browser ---------------------------------------------------------------------------


def test_browser_sign_in_post_list_json_script_as_text_sign_out(running_site, browser):
    # CSP off in this context: the escaping alone must keep the <script> note from running
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(10_000)
    try:
        page.goto(running_site.nginx.url("/notes.lua"))
        assert page.title() == "Notes · showcase test"
        page.get_by_label("Your name").fill("Ada <Lovelace>")
        page.get_by_role("button", name="Sign in").click()
        assert page.locator(".flash").inner_text() == "Welcome, Ada <Lovelace>."
        assert page.locator(".who strong").inner_text() == "Ada <Lovelace>"
        session = [c for c in context.cookies() if c["name"] == "XLuaSession"]
        assert session and session[0]["httpOnly"]

        text = "Hello from Chromium.\nSecond line, with <b>tags</b> & ampersands."
        page.get_by_label("New note").fill(text)
        page.get_by_role("button", name="Post").click()
        assert page.locator(".flash").inner_text() == "Note posted."
        newest = page.locator("article.note").first
        assert newest.locator(".author").inner_text() == "Ada <Lovelace>"
        assert newest.locator("p").inner_text() == text
        assert newest.locator("b").count() == 0

        with page.expect_response(lambda r: "format=json" in r.url) as answer:
            page.get_by_role("link", name="JSON").click()
        notes = answer.value.json()["notes"]
        assert (notes[0]["author"], notes[0]["text"]) == ("Ada <Lovelace>", text)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", notes[0]["created"])
        page.go_back()

        script = "<script>window.__pwned = 1; document.title = 'pwned'</script>"
        page.get_by_label("New note").fill(script)
        page.get_by_role("button", name="Post").click()
        assert page.locator("article.note").first.locator("p").inner_text() == script
        assert page.locator("section.notes script").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.title() == "Notes · showcase test"

        page.get_by_role("button", name="Sign out").click()
        assert page.locator(".flash").inner_text() == "Signed out."
        assert page.get_by_label("Your name").is_visible()
        assert page.locator(".who").count() == 0
        assert page.locator("article.note p").nth(1).inner_text() == text  # still listed
    finally:
        context.close()


def test_browser_phone_width_has_no_sideways_scroll(running_site, browser):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    try:
        visitor = Visitor(running_site.port)
        visitor.sign_in("Grace")
        assert visitor.post({"action": "post", "body": "x" * 300}).status == 303  # one long word
        page.goto(running_site.nginx.url("/notes.lua"))
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        assert page.locator("section.notes").bounding_box()["width"] <= 360
    finally:
        context.close()


# --- over plain HTTP -----------------------------------------------------------------------


def test_a_post_without_the_sessions_token_gets_403_and_changes_nothing(running_site):
    visitor = Visitor(running_site.port)
    visitor.sign_in("Mallory's target")
    other = Visitor(running_site.port)
    other.get()
    before = running_site.get("/notes.lua?format=json").body
    for token in (None, "", "0" * 32, other.token):
        reply = visitor.post({"action": "post", "body": "forged"}, token=token)
        assert reply.status == 403, (token, reply)
        assert b"This form has expired" in reply.body
    # a form from another site carries no cookie at all
    stranger = http(running_site.port, "/notes.lua", method="POST", headers={"Content-Type": FORM},
                    body=b"action=post&body=forged&csrf=" + visitor.token.encode())
    assert stranger.status == 403
    assert running_site.get("/notes.lua?format=json").body == before
    # the real token still works, and signing out needs it too
    assert visitor.post({"action": "post", "body": "genuine"}).status == 303
    assert visitor.notes()[0]["text"] == "genuine"
    assert visitor.post({"action": "signout"}, token=None).status == 403
    assert b"Signed in as" in visitor.get().body


def test_the_page_allows_no_script_and_escapes_what_users_wrote(running_site):
    visitor = Visitor(running_site.port)
    visitor.sign_in('<img src=x onerror="alert(1)">')
    assert visitor.post({"action": "post", "body": "a \"quoted\" 'note' <i>"}).status == 303
    reply = visitor.get()
    policy = reply.header("Content-Security-Policy")
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert b"<img" not in reply.body and b"<i>" not in reply.body
    assert b"&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in reply.body
    assert b"a &quot;quoted&quot; &#39;note&#39; &lt;i&gt;" in reply.body


def test_a_note_over_the_limit_is_refused_with_its_text_kept(running_site):
    visitor = Visitor(running_site.port)
    visitor.sign_in("Limit")
    too_long = "é" * 2001  # characters, not bytes, are counted
    assert visitor.post({"action": "post", "body": too_long}).status == 303
    page = visitor.get().body.decode()
    assert "Your note has 2001 characters; the limit is 2000." in page
    assert f">{too_long}</textarea>" in page
    assert visitor.notes()[0]["text"] != too_long
    assert visitor.post({"action": "post", "body": "é" * 2000}).status == 303
    assert visitor.notes()[0]["text"] == "é" * 2000
    assert visitor.post({"action": "post", "body": "  \r\n "}).status == 303
    assert "Write something first." in visitor.get().body.decode()
    assert visitor.post({"action": "post", "body": "bell\x07"}).status == 303
    assert "characters that cannot be stored" in visitor.get().body.decode()


def test_posting_needs_a_sign_in_and_other_methods_are_refused(running_site):
    visitor = Visitor(running_site.port)
    visitor.get()
    assert visitor.post({"action": "post", "body": "anonymous"}).status == 303
    assert "Sign in to post a note." in visitor.get().body.decode()
    assert all(note["text"] != "anonymous" for note in visitor.notes())
    reply = http(running_site.port, "/notes.lua", method="DELETE")
    assert (reply.status, reply.header("Allow")) == (405, "GET, HEAD, POST")


# --- every runtime: the page, the persistent connection, the reconnect ----------------------


def connection_figures(body: bytes) -> tuple:
    """(opened, queries) from the page's footer."""
    found = re.search(rb"SQLite connection: opened (\d\d:\d\d:\d\d) UTC, (\d+) quer", body)
    assert found, body[-400:]
    return found.group(1), int(found.group(2))


@pytest.mark.parametrize("lua", RUNTIMES)
def test_the_board_on_each_runtime_keeps_and_renews_its_connection(tmp_path, lua):
    need_driver(lua)
    # one process, one thread, one state: every request meets the same connection
    with notes_site(tmp_path, lua=lua, processes=1, workers=1, states=1) as web:
        visitor = Visitor(web.port)
        assert visitor.notes() == []
        first = visitor.get()
        assert first.status == 200, first
        expected_runtime = b"LuaJIT" if lua == "luajit" else b"Lua " + lua.encode()
        assert b" \xc2\xb7 " + expected_runtime in first.body
        opened, queries = connection_figures(first.body)

        visitor.sign_in(f"on {lua}")
        assert visitor.post({"action": "post", "body": f"written by Lua {lua}"}).status == 303
        assert visitor.notes()[0]["text"] == f"written by Lua {lua}"
        again_opened, again_queries = connection_figures(visitor.get().body)
        assert again_opened == opened and again_queries > queries  # the same connection

        # The table is dropped by hand (to empty the board) under the open connection: its
        # next write fails, and the module reconnects once, which makes the table again.
        with sqlite3.connect(tmp_path / "notes.db", timeout=10) as database:
            database.execute("DROP TABLE notes")
        reply = visitor.post({"action": "post", "body": "after the table was dropped"})
        assert reply.status == 303, (reply, web.server.output()[-2000:])
        with sqlite3.connect(tmp_path / "notes.db", timeout=10) as database:
            rows = database.execute("SELECT author, body FROM notes").fetchall()
        assert rows == [(f"on {lua}", "after the table was dropped")]
        _, renewed_queries = connection_figures(visitor.get().body)
        assert renewed_queries < again_queries  # a new connection counts from zero
