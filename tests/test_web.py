"""The web chat page in headless Chromium (the system's Chromium or Chrome found on PATH, else Playwright's
own download, driven by Playwright), against a live `pakar serve` app with a real tiny model
(tests/test_serve.py's memorising checkpoint).

What it checks, as a user would see it: the answer streams in piece by piece; model output that is
HTML (the model was trained to answer "Tulis HTML" with `<b>tebal</b> <img src=x onerror=alert(1)>`)
is shown as those characters, creating no element and running no script; Stop ends a long answer
and the server cancels the generation; the conversation survives a reload (localStorage); New chat
starts an empty conversation while the old one stays in the list. A text model (not chat
fine-tuned) gets a note saying so and how to get a chat model; a chat model none. The page speaks
one language, from the browser's (Indonesian for id-ID, else English), switchable; it has a favicon.

The HTML check uses a real model and the real endpoint: the model produces the markup itself, so
the page's rendering of genuine streamed output is what is tested, not a canned response.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from test_serve import COUNT_PROMPT, HTML_ANSWER, MODEL_NAME, LiveServer, tiny_chat_checkpoint

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def find_chromium() -> str | None:
    """A Chromium-family browser on PATH (Debian/Ubuntu, Fedora, Chrome, Windows' Edge), else the one
    `playwright install chromium` downloaded, else None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "msedge"):
        if path := shutil.which(name):
            return path
    with sync_api.sync_playwright() as p:
        own = p.chromium.executable_path
    return own if own and os.path.exists(own) else None


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium found (install your system's chromium package, or run `playwright install "
                "chromium`) to run the web page test", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LiveServer(tiny_chat_checkpoint(tmp_path_factory.getbasetemp()))
    yield s
    s.close()


@contextlib.contextmanager
def open_page(server, locale: str = "en-US"):
    """The chat page in a fresh browser with the given browser language, once it has the model's name."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_context(locale=locale).new_page()
            pg.set_default_timeout(60_000)
            pg.dialogs, pg.errors, pg.failed = [], [], []
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.on("response", lambda r: r.status >= 400 and pg.failed.append(f"{r.status} {r.url}"))
            pg.goto(server.url + "/")
            pg.wait_for_function(f"() => document.getElementById('model-name').textContent === "
                                 f"{server.model_name!r}")
            yield pg
        finally:
            browser.close()


@pytest.fixture
def page(server):
    with open_page(server) as pg:
        yield pg


def set_value(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def send_and_record(page, text: str) -> None:
    """Type and send a message; record every text the newest assistant bubble shows while streaming."""
    page.evaluate("""() => {
        window.seen = [];
        const box = document.getElementById('messages');
        new MutationObserver(() => {
            const bubbles = box.querySelectorAll('.message.assistant');
            if (bubbles.length) window.seen.push(bubbles[bubbles.length - 1].textContent);
        }).observe(box, {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page) -> None:
    page.wait_for_function("() => !document.getElementById('send').disabled && !document.querySelector('.streaming')")


def test_chat_page_streams_escapes_stops_and_keeps_history(page, server):
    set_value(page, "#temperature", 0)  # greedy: the memorised answers
    set_value(page, "#max-tokens", 450)

    # 1. a streamed answer that is HTML is shown as text
    send_and_record(page, "Tulis HTML")
    wait_idle(page)
    bubble = page.locator(".message.assistant").last
    assert bubble.text_content() == HTML_ANSWER
    assert bubble.evaluate("e => e.children.length") == 0  # no <b>, no <img>: text nodes only
    assert page.locator("#messages b, #messages img, #messages script").count() == 0
    assert page.dialogs == [] and page.errors == []
    seen = [s for s in page.evaluate("() => window.seen") if s]
    assert all(HTML_ANSWER.startswith(s) for s in seen)  # it only ever grew, as a stream does

    # 2. a long answer streams in: it is on the page while the server is still generating it, and
    #    Stop ends it there (the server counts the cancellation)
    cancelled = server.health()["finished"]["cancelled"]
    # press Stop from inside the page as soon as the answer has started: a round trip through the
    # test driver could take longer than the tiny model needs for the whole answer
    page.evaluate("""() => { window.stoppedAt = new Promise(resolve => {
        const box = document.getElementById('messages');
        const obs = new MutationObserver(() => {
            const b = box.querySelectorAll('.message.assistant');
            if (b.length === 2 && b[1].textContent.length > 30) {
                obs.disconnect();
                document.getElementById('stop').click();
                resolve(b[1].textContent.length);
            }
        });
        obs.observe(box, {subtree: true, childList: true, characterData: true});
    }); }""")
    send_and_record(page, COUNT_PROMPT)
    assert page.evaluate("() => Promise.race([window.stoppedAt, new Promise(r => setTimeout(() => r(-1), 60000))])") > 30
    page.wait_for_selector(".message.note >> text=Stopped.")
    wait_idle(page)
    stopped = page.locator(".message.assistant").last.text_content()
    assert len(stopped) > 30
    page.wait_for_timeout(500)
    assert page.locator(".message.assistant").last.text_content() == stopped  # nothing more arrived
    assert server.health()["finished"]["cancelled"] == cancelled + 1

    # 3. history survives a reload, still rendered as text
    page.reload()
    page.wait_for_selector(".message.assistant")
    texts = page.locator(".message").all_text_contents()
    assert texts == ["Tulis HTML", HTML_ANSWER, COUNT_PROMPT, stopped]
    assert page.locator("#messages b, #messages img").count() == 0

    # 4. New chat starts empty; the earlier conversation stays in the list and can be reopened
    page.click("#new-chat")
    assert page.locator("#messages .message").count() == 0
    assert page.locator("#chat-list li").count() == 2
    send_and_record(page, "Halo")
    wait_idle(page)
    assert page.locator(".message.assistant").last.text_content() == "Halo juga! Apa kabar hari ini?"
    page.locator("#chat-list li .open", has_text="Tulis HTML").click()
    assert page.locator(".message").all_text_contents() == texts
    assert page.dialogs == [] and page.errors == []


def test_page_is_served_with_a_strict_content_security_policy(server):
    import httpx

    for path in ("/", "/app.js", "/style.css", "/favicon.svg"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    js = httpx.get(server.url + "/app.js").text
    assert "innerHTML" not in js.replace("never innerHTML", "")  # text is only ever set as textContent
    html = httpx.get(server.url + "/").text
    assert "http://" not in html and "https://" not in html  # nothing from a CDN


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    """The same tiny model, its checkpoint marked as not chat fine-tuned (a pretrained text model)."""
    from pakar.checkpoint import atomic_save, safe_load

    ckpt = safe_load(tiny_chat_checkpoint(tmp_path_factory.getbasetemp()))
    ckpt["meta"]["chat"] = False
    path = tmp_path_factory.mktemp("text") / "tiny_text.pt"
    atomic_save(ckpt, path)
    s = LiveServer(path)
    yield s
    s.close()


def test_text_model_note_language_and_favicon(server, text_server):
    import httpx

    # the server says whether the model is chat fine-tuned (the checkpoint's meta)
    assert httpx.get(text_server.url + "/v1/models").json()["data"][0]["chat"] is False
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["chat"] is True
    for url in (server.url + "/favicon.svg", server.url + "/favicon.ico"):
        r = httpx.get(url)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content

    # a text model: a note says what it does and how to get a chat model; nothing on the page fails to load
    with open_page(text_server) as pg:
        note = pg.locator("#model-note")
        assert note.is_visible()
        assert "text model" in note.text_content() and "pakar finetune" in note.text_content()
        assert pg.eval_on_selector("link[rel=icon]", "e => e.href").endswith("/favicon.svg")
        assert pg.evaluate("() => fetch(document.querySelector('link[rel=icon]').href).then(r => r.status)") == 200
        assert pg.failed == [] and pg.errors == []
    # a chat model: no note
    with open_page(server) as pg:
        assert not pg.locator("#model-note").is_visible()

    # one language at a time: Indonesian for an Indonesian browser, English after switching
    with open_page(text_server, locale="id-ID") as pg:
        assert pg.evaluate("() => document.documentElement.lang") == "id"
        assert pg.locator("#send").text_content() == "Kirim"
        assert pg.locator("#new-chat").text_content() == "+ Obrolan baru"
        assert "model teks" in pg.locator("#model-note").text_content()
        pg.select_option("#language", "en")
        assert pg.locator("#send").text_content() == "Send"
        assert "text model" in pg.locator("#model-note").text_content()
        assert pg.get_attribute("#input", "placeholder").startswith("Write a message")
        pg.reload()  # the choice is kept
        pg.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL_NAME!r}")
        assert pg.locator("#send").text_content() == "Send"
        assert pg.errors == []
