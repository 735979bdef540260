"""The web console over TestClient: sign-in, CSRF, every page, 404s, links, privacy (fast, no browser)."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from tests.conftest import _migrated_ctx, make_settings
from tests.web.conftest import CSRF, IDENT, NAMES, PATIENT_IDS, READER, TOKEN, csrf_of, sign_in

PAGES = ["/", "/nodes", "/retrievals", "/worklists", "/instances", "/cohorts", "/training", "/models"]
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag in ("img", "script") and a.get("src"):
            self.links.append(a["src"])
        elif tag == "link" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "form" and (a.get("method") or "get").lower() == "get" and a.get("action"):
            self.links.append(a["action"])


def links_of(html: str) -> list[str]:
    p = Links()
    p.feed(html)
    return p.links


# ------------------------------------------------------------------ sign-in
def test_pages_redirect_to_sign_in_then_open_with_the_session_cookie(console):
    c, _ = console
    for path in PAGES:
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    assert c.get("/cohorts").headers["location"] == "/login?next=%2Fcohorts"
    r = sign_in(c, next_url="/cohorts")
    assert r.status_code == 303 and r.headers["location"] == "/cohorts"
    cookies = r.headers.get_list("set-cookie")
    session = next(h for h in cookies if h.startswith("radcohort_session="))
    assert "HttpOnly" in session and "SameSite=strict" in session and "Path=/" in session
    assert TOKEN not in session  # the cookie holds a signed fingerprint, never the token
    for path in PAGES:
        assert c.get(path).status_code == 200, path
    page = c.get("/")
    assert "token:alice" in page.text and "Sign out" in page.text


def test_a_wrong_token_is_refused_and_a_forged_cookie_is_ignored(console):
    c, _ = console
    r = sign_in(c, token="not-a-token")
    assert r.status_code == 401 and "Unknown token" in r.text
    assert "radcohort_session" not in c.cookies
    c.cookies.set("radcohort_session", "eyJmIjoiYWJjIiwiZSI6OTk5OTk5OTk5OSwibiI6Im4ifQ.forged")
    assert c.get("/nodes").status_code == 303


def test_sign_out_ends_the_session(console):
    c, _ = console
    sign_in(c)
    csrf = csrf_of(c, "/")
    r = c.post("/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.get("/").status_code == 303


def test_pages_accept_the_api_bearer_token_and_a_bad_one_is_401(console):
    c, _ = console
    for path in PAGES:
        assert c.get(path, headers=BEARER).status_code == 200, path
    assert c.get("/nodes", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_no_tokens_configured_means_open_like_the_api(tmp_path):
    settings = make_settings(tmp_path)
    for ctx in _migrated_ctx(settings):
        with TestClient(create_app(settings, ctx), follow_redirects=False) as c:
            for path in PAGES:
                assert c.get(path).status_code == 200, path
            assert "open console" in c.get("/").text
            assert "console is open" in c.get("/login").text
            # forms still need their CSRF token
            r = c.post("/nodes", data={"name": "x", "ae_title": "X", "host": "127.0.0.1", "port": "104"})
            assert r.status_code == 403


def test_the_api_and_its_offline_docs_are_unchanged(console):
    c, _ = console
    assert c.get("/api/v1/stats").status_code == 401  # the API still wants its bearer token
    sign_in(c)
    assert c.get("/api/v1/stats").status_code == 401  # ... and never takes the console's cookie
    assert c.get("/api/v1/stats", headers=BEARER).status_code == 200
    docs = c.get("/docs", headers=BEARER)
    assert docs.status_code == 200 and "/static/api-docs/swagger-ui-bundle.js" in docs.text
    schema = c.get("/openapi.json", headers=BEARER).json()
    assert all(p.startswith("/api/v1/") or p == "/health" for p in schema["paths"]), "console routes leaked into the API schema"
    assert c.get("/health").status_code == 200


# ------------------------------------------------------------------ CSRF
@pytest.mark.parametrize("path", ["/nodes", "/retrievals", "/cohorts", "/training", "/logout",
                                  "/nodes/main-pacs/echo", "/retrievals/1/cancel", "/training/1/cancel",
                                  "/worklists/upload", "/worklists/1/resolve", "/worklists/1/retrieve",
                                  "/cohorts/1/exports", "/cohorts/1/exports/1/delete"])
def test_a_form_without_its_csrf_token_is_refused_403_with_a_message(console, path):
    c, _ = console
    sign_in(c)
    for data in ({}, {"csrf_token": "0" * 64}):
        r = c.post(path, data=data)
        assert r.status_code == 403, (path, r.status_code)
        assert "security token" in r.text and "reload the page" in r.text


def test_the_csrf_token_of_another_session_does_not_work(console, tmp_path):
    c, _ = console
    sign_in(c)
    good = csrf_of(c, "/nodes")
    c.cookies.clear()
    sign_in(c)  # a new session and CSRF nonce: the old page's token is stale
    assert c.cookies.get("radcohort_csrf")
    r = c.post("/nodes", data={"csrf_token": good, "name": "x", "ae_title": "X", "host": "127.0.0.1", "port": "104"})
    assert r.status_code == 403


def test_the_login_form_itself_needs_its_csrf_token(console):
    c, _ = console
    assert c.post("/login", data={"token": TOKEN}).status_code == 403


def test_failed_sign_ins_are_throttled_per_client_address(tmp_path):
    settings = make_settings(tmp_path, api_tokens=f"alice:{TOKEN}:read", login_max_failures=3, login_window_s=2)
    for ctx in _migrated_ctx(settings):
        app = create_app(settings, ctx)
        with TestClient(app, follow_redirects=False, client=("198.51.100.7", 40000)) as guesser:
            colleague = TestClient(app, follow_redirects=False, client=("198.51.100.8", 40000))
            for i in range(3):
                r = sign_in(guesser, f"guess-{i}")
                assert r.status_code == 401 and "Unknown token" in r.text
            refused = sign_in(guesser, TOKEN)  # the right token too: a lucky guess must not show through
            assert refused.status_code == 429, refused.text
            assert "Too many failed sign-ins" in refused.text and "radcohort_session" not in refused.cookies
            wait = int(refused.headers["retry-after"])
            assert 1 <= wait <= 2
            assert sign_in(guesser, "guess-again").status_code == 429  # refusals do not count, nor reset
            # another address signs in as usual; the API's bearer header is not the form's business
            assert sign_in(colleague, TOKEN).status_code == 303
            assert guesser.get("/api/v1/cohorts", headers=BEARER).status_code == 200
            time.sleep(wait + 0.2)  # the failures left the window
            ok = sign_in(guesser, TOKEN)
            assert ok.status_code == 303 and ok.cookies.get("radcohort_session")


# ------------------------------------------------------------------ forms through the services
def test_register_a_node_edit_it_and_see_it_everywhere(console):
    c, _ = console
    sign_in(c)
    csrf = csrf_of(c, "/nodes")
    bad = c.post("/nodes", data={"csrf_token": csrf, "name": "bad name!", "ae_title": "X" * 20, "host": "h", "port": "0"})
    assert bad.status_code == 422 and "Please check" in bad.text and 'value="h"' in bad.text
    r = c.post("/nodes", data={"csrf_token": csrf, "name": "second", "ae_title": "SECOND", "host": "127.0.0.1",
                               "port": "1", "retrieve_method": "get"})
    assert r.status_code == 303 and r.headers["location"] == "/nodes/second"
    page = c.get("/nodes/second")
    assert "registered" in page.text and "SECOND@127.0.0.1:1" in page.text
    dup = c.post("/nodes", data={"csrf_token": csrf, "name": "second", "ae_title": "S", "host": "127.0.0.1", "port": "2"})
    assert dup.status_code == 409 and "already exists" in dup.text
    # the same record the API reads
    assert c.get("/api/v1/pacs-nodes/second", headers=BEARER).json()["retrieve_method"] == "get"
    edit = c.post("/nodes/second/edit", data={"csrf_token": csrf, "retrieve_method": "move", "protocol": "dimse",
                                              "timezone": "Asia/Tokyo", "max_associations": "3", "w0_mon": "1",
                                              "w0_start": "20:00", "w0_end": "06:00", "urgent_allowed": "1"})
    assert edit.status_code == 303
    pol = c.get("/api/v1/pacs-nodes/second/policy", headers=BEARER).json()
    assert pol["policy"]["timezone"] == "Asia/Tokyo" and pol["policy"]["windows"][0]["days"] == ["mon"]
    bad_tz = c.post("/nodes/second/edit", data={"csrf_token": csrf, "timezone": "Mars/Olympus"})
    assert bad_tz.status_code == 422 and "unknown time zone" in bad_tz.text
    # an echo to a closed port fails with a reason, kept as the node's last verdict
    echo = c.post("/nodes/second/echo", data={"csrf_token": csrf})
    assert echo.status_code == 303
    assert "C-ECHO failed" in c.get("/nodes/second").text
    assert "failed" in c.get("/").text


def test_start_a_retrieval_needs_a_date_and_uses_the_api_service(console):
    c, _ = console
    sign_in(c)
    csrf = csrf_of(c, "/retrievals")
    r = c.post("/retrievals", data={"csrf_token": csrf, "node": "main-pacs", "Modality": "CR"})
    assert r.status_code == 422 and "StudyDate" in r.text
    r = c.post("/retrievals", data={"csrf_token": csrf, "node": "nosuch", "StudyDate": "20150101-20151231"})
    assert r.status_code == 404 and "no PACS node" in r.text
    r = c.post("/retrievals", data={"csrf_token": csrf, "node": "main-pacs", "StudyDate": "20150101-20151231",
                                    "Modality": "CR"})
    assert r.status_code == 303
    rid = int(r.headers["location"].rsplit("/", 1)[1])
    got = c.get(f"/api/v1/retrievals/{rid}", headers=BEARER).json()
    assert got["query"] == {"StudyDate": "20150101-20151231", "Modality": "CR"}
    page = c.get(f"/retrievals/{rid}")
    assert page.status_code == 200 and f"Retrieval {rid}" in page.text
    live = c.get(f"/retrievals/{rid}/live", headers={"X-Console-Poll": "1"})
    assert live.status_code == 200 and "<html" not in live.text and 'id="retrieval-live"' in live.text


def test_retrieval_report_and_controls(console):
    c, ids = console
    sign_in(c)
    page = c.get(f"/retrievals/{ids['retrieval']}").text
    assert "1.2.3.4.5" in page and "1.2.3.4.6" in page and "0xA702" in page and "data-final" in page
    csrf = CSRF.search(page).group(1)
    r = c.post(f"/retrievals/{ids['retrieval']}/pause", data={"csrf_token": csrf})
    assert r.status_code == 303 and "Not possible" in c.get(r.headers["location"]).text
    assert c.post(f"/retrievals/{ids['retrieval']}/explode", data={"csrf_token": csrf}).status_code == 404


def test_cohort_preview_then_save_then_manifest(console):
    c, ids = console
    sign_in(c)
    csrf = csrf_of(c, "/cohorts")
    pv = c.post("/cohorts", data={"csrf_token": csrf, "taxonomy": "knee-lr", "test": "0.5", "action": "preview"})
    assert pv.status_code == 200 and 'id="cohort-preview"' in pv.text and "<svg" in pv.text
    before = c.get("/api/v1/cohorts", headers=BEARER).json()["total"]
    saved = c.post("/cohorts", data={"csrf_token": csrf, "taxonomy": "knee-lr", "test": "0.5", "action": "save"})
    assert saved.status_code == 303
    assert c.get("/api/v1/cohorts", headers=BEARER).json()["total"] == before + 1
    detail = c.get(saved.headers["location"])
    assert detail.status_code == 200 and "LtK" in detail.text and "<svg" in detail.text
    cid = saved.headers["location"].rsplit("/", 1)[1]
    csv = c.get(f"/cohorts/{cid}/manifest.csv")
    assert csv.status_code == 200 and csv.text.startswith("sop_instance_uid") and "patient_key" in csv.text
    bad = c.post("/cohorts", data={"csrf_token": csrf, "taxonomy": "knee-lr", "test": "1.5"})
    assert bad.status_code == 422
    tax = c.post("/cohorts/taxonomies", data={"csrf_token": csrf, "name": "kn2",
                                              "classes": "L: body_part=KNEE, laterality=L\nR: body_part=KNEE, laterality=R"})
    assert tax.status_code == 303
    assert c.get("/api/v1/taxonomies/kn2", headers=BEARER).status_code == 200
    bad_tax = c.post("/cohorts/taxonomies", data={"csrf_token": csrf, "name": "kn3", "classes": "oops"})
    assert bad_tax.status_code == 422 and "NAME: label=value" in bad_tax.text


def test_training_pages_table2_confusion_curves_and_galleries(console):
    c, ids = console
    sign_in(c)
    done = c.get(f"/training/{ids['done']}").text
    assert 'id="table2"' in done and "100.0 %" in done and "0.900 ± 0.050" in done
    assert "Confusion matrix" in done and "rotate90" in done and "<polyline" in done
    assert f"/instances/{ids['uids'][0]}/thumbnail.png" in done and "data-final" in done
    running = c.get(f"/training/{ids['running']}").text
    assert f'data-poll="/training/{ids["running"]}/live"' in running
    csrf = CSRF.search(running).group(1)
    bad = c.post("/training", data={"csrf_token": csrf, "cohort_id": str(ids["cohort"]), "model": "nosuchnet",
                                    "epochs": "2", "image_size": "64"})
    assert bad.status_code == 422 and "unknown model" in bad.text
    ok = c.post("/training", data={"csrf_token": csrf, "cohort_id": str(ids["cohort"]), "model": "resnet18",
                                   "epochs": "2", "image_size": "64", "exp_rotate90": "1"})
    assert ok.status_code == 303
    jid = int(ok.headers["location"].rsplit("/", 1)[1])
    job = c.get(f"/api/v1/training-jobs/{jid}", headers=BEARER).json()
    assert job["params"]["experiments"] == ["rotate90"] and job["epochs"] == 2
    cancel = c.post(f"/training/{jid}/cancel", data={"csrf_token": csrf})
    assert cancel.status_code == 303
    assert c.get(f"/api/v1/training-jobs/{jid}", headers=BEARER).json()["status"] == "cancelled"


def test_thumbnails_are_small_pngs_without_metadata(console):
    from io import BytesIO

    from PIL import Image

    c, ids = console
    r = c.get(f"/instances/{ids['uids'][1]}/thumbnail.png?size=96", headers=BEARER)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(BytesIO(r.content))
    assert max(im.size) <= 96 and im.mode == "L" and not {k for k in im.info if k not in ("dpi", "gamma")}
    assert c.get("/instances/1.2.3.999/thumbnail.png", headers=BEARER).status_code == 404
    assert c.get("/instances/not-a-uid/thumbnail.png", headers=BEARER).status_code == 404


def test_index_filters_by_label(console):
    c, _ = console
    sign_in(c)
    left = c.get("/instances?label_laterality=L&label_body_part=&offset=0")
    assert left.status_code == 200 and "12 images match" in left.text
    bad = c.get("/instances?age_min=old")
    assert bad.status_code == 422 and "number of years" in bad.text
    bad = c.get("/instances?study_date=2015")
    assert bad.status_code == 422 and "YYYYMMDD" in bad.text


@pytest.mark.parametrize("path", ["/retrievals/999", "/nodes/nosuch", "/training/999", "/cohorts/999", "/models/999",
                                  "/instances/1.2.3.999", "/instances/abc", "/training/999/live",
                                  "/cohorts/999/manifest.csv", "/cohorts/1/manifest.xlsx", "/nodes/nosuch/live",
                                  "/worklists/999", "/worklists/999/live", "/worklists/999/results.csv",
                                  "/cohorts/999/exports/live", "/cohorts/1/exports/999/download"])
def test_unknown_ids_are_404_pages(console, path):
    c, _ = console
    sign_in(c)
    r = c.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "text/html" in r.headers["content-type"] and "Not found" in r.text


def test_bad_ids_are_422_pages_not_500(console):
    c, _ = console
    sign_in(c)
    r = c.get("/retrievals/abc")
    assert r.status_code == 422 and "text/html" in r.headers["content-type"]
    assert c.get("/training/99999999999999999999").status_code in (404, 422)


# ------------------------------------------------------------------ crawl + privacy
def crawl(c, start: list[str], headers=None) -> dict[str, str]:
    """Every internal link of every page, followed; {url: html}. Fails on any 4xx/5xx."""
    seen: dict[str, str] = {}
    todo = list(start)
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        r = c.get(url, headers=headers or {})
        assert r.status_code < 400, f"broken link {url}: {r.status_code} {r.text[:300]}"
        if r.status_code in (301, 302, 303, 307):
            todo.append(r.headers["location"])
            seen[url] = ""
            continue
        ctype = r.headers.get("content-type", "")
        seen[url] = r.text if ctype.startswith(("text/", "application/json")) else ""
        if ctype.startswith("text/html"):
            for link in links_of(r.text):
                full = urljoin(url, link)
                parts = urlsplit(full)
                assert not parts.netloc or parts.hostname in ("testserver",), f"{url} links off-site: {link}"
                if parts.scheme in ("", "http") and not parts.path.startswith("/api/"):
                    todo.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    return seen


def test_every_internal_link_on_every_page_resolves_and_no_page_shows_an_identifier(console):
    c, ids = console
    sign_in(c)
    pages = crawl(c, PAGES + [f"/training/{ids['running']}", f"/training/{ids['running']}/live", "/overview/jobs",
                              f"/retrievals/{ids['retrieval']}/live", "/nodes/main-pacs/live",
                              f"/worklists/{ids['worklist']}/live", f"/cohorts/{ids['cohort']}/exports/live"])
    visited = set(pages)
    for must in (f"/training/{ids['done']}", f"/cohorts/{ids['cohort']}", f"/retrievals/{ids['retrieval']}",
                 f"/models/{ids['model']}", "/nodes/main-pacs", f"/instances/{ids['uids'][0]}",
                 f"/cohorts/{ids['cohort']}/manifest.csv", "/static/console/console.js",
                 f"/worklists/{ids['worklist']}", f"/worklists/{ids['worklist']}/results.csv"):
        assert must in visited, f"{must} not reachable by links"
    assert len(visited) > 40
    text = "\n".join(pages.values())
    for secret in NAMES + PATIENT_IDS + [n.replace("^", " ") for n in NAMES] + ["ACC00001", "19700101"]:
        assert secret not in text, f"an identifier ({secret}) is on a console page"
    # the manifest names patients by pseudonym only
    assert "patient_key" in pages[f"/cohorts/{ids['cohort']}/manifest.csv"]


def test_a_read_only_token_sees_pages(console):
    c, _ = console
    sign_in(c, token=READER)
    assert c.get("/").status_code == 200 and "token:bob" in c.get("/").text


def test_security_headers_on_pages(console):
    c, _ = console
    r = c.get("/", headers=BEARER)
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


# ------------------------------------------------------------------ worklists (issue #17)
POLL = {"X-Console-Poll": "1"}
HIDDEN_KEY = '<span class="muted">hidden</span>'


def poll_until_final(c, url: str, timeout: float = 90) -> str:
    """The live fragment at `url`, re-fetched like console.js does until it says the job has ended."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(url, headers=POLL)
        assert r.status_code == 200 and "<html" not in r.text, (url, r.status_code, r.text[:300])
        head = r.text[:r.text.index(">")]
        if "data-final" in head:
            return r.text
        assert "data-poll=" in head, head
        assert time.monotonic() < deadline, f"{url} still live after {timeout} s: {r.text[:500]}"
        time.sleep(0.2)


def test_worklist_keys_are_shown_only_with_find_identified_as_the_api_does(console):
    c, ids = console
    wid = ids["worklist"]
    sign_in(c)  # alice: retrieve, not find-identified
    page = c.get(f"/worklists/{wid}").text
    assert "ward.csv" in page and page.count(HIDDEN_KEY) == 2 and "not a calendar date" in page
    assert PATIENT_IDS[0] not in page and PATIENT_IDS[1] not in page and NAMES[0] not in page
    assert 'id="worklist-resolve"' not in page and "find-identified" in page
    # the page hides what the API hides, and refuses what it refuses (403, audited by the API's route)
    api = c.get(f"/api/v1/worklists/{wid}", headers=BEARER).json()
    assert [r["key"] for r in api["rows"]] == [None, None]
    csrf = CSRF.search(page).group(1)
    r = c.post(f"/worklists/{wid}/resolve", data={"csrf_token": csrf, "node": "main-pacs"})
    assert r.status_code == 403 and "find-identified" in r.text and PATIENT_IDS[0] not in r.text
    assert c.get(f"/api/v1/worklists/{wid}", headers=BEARER).json()["status"] == "uploaded"
    assert PATIENT_IDS[0] not in c.get(f"/worklists/{wid}/results.csv").text
    # a token with find-identified sees the keys (and the description typed next to them)
    c.cookies.clear()
    sign_in(c, token=IDENT)
    page = c.get(f"/worklists/{wid}").text
    assert PATIENT_IDS[0] in page and PATIENT_IDS[1] in page and NAMES[0] in page and HIDDEN_KEY not in page
    assert 'id="worklist-resolve"' in page
    assert PATIENT_IDS[0] in c.get(f"/worklists/{wid}/results.csv").text


def test_worklist_upload_shows_per_file_and_per_row_errors(console):
    c, _ = console
    # an upload's body is read only for a signed-in session (or a bearer token), like /models/{id}/predict
    anon = c.post("/worklists/upload", files={"file": ("uids.csv", b"StudyInstanceUID\n1.2.3\n")})
    assert anon.status_code == 401
    assert c.get("/worklists").status_code == 303  # the page itself sends you to the sign-in form
    sign_in(c)
    csrf = csrf_of(c, "/worklists")
    up = lambda name, data, **form: c.post("/worklists/upload", data={"csrf_token": csrf, **form},  # noqa: E731
                                           files={"file": (name, data)})
    bad = up("scan.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert bad.status_code == 415 and "not CSV or XLSX" in bad.text and 'id="worklist-upload"' in bad.text
    bad = up("list.csv", b"Name,Notes\nx,y\n")
    assert bad.status_code == 422 and "no key column" in bad.text
    bad = up("list.csv", b"StudyInstanceUID\n1.2.3\n", column="Modality")
    assert bad.status_code == 422 and "not a key column" in bad.text and "Please check" in bad.text
    bad = up("ids.csv", f"PatientID\n{PATIENT_IDS[2]}\n".encode())
    assert bad.status_code == 403 and "find-identified" in bad.text and PATIENT_IDS[2] not in bad.text
    before = c.get("/api/v1/worklists", headers=BEARER).json()["total"]
    ok = up("uids.csv", b"StudyInstanceUID;Notes\n1.2.840.1;a\nnot-a-uid;b\n1.2.840.1;c\n")
    assert ok.status_code == 303, ok.text
    assert c.get("/api/v1/worklists", headers=BEARER).json()["total"] == before + 1
    page = c.get(ok.headers["location"]).text
    assert "3 rows by StudyInstanceUID, 2 invalid" in page  # the flash
    assert "not a UID" in page and "duplicate of row 2" in page and "unknown column" in page
    assert "<code>1.2.840.1</code>" in page  # a StudyInstanceUID list needs no find-identified
    listing = c.get("/worklists").text
    assert "uids.csv" in listing and "invalid 2" in listing and "pending 1" in listing
    # a read-only token gets no form, and the API's refusal if it posts anyway
    c.cookies.clear()
    sign_in(c, token=READER)
    page = c.get("/worklists").text
    assert 'id="worklist-upload"' not in page and "lacks the scope" in page
    r = c.post("/worklists/upload", data={"csrf_token": CSRF.search(page).group(1)},
               files={"file": ("uids.csv", b"StudyInstanceUID\n1.2.3\n")})
    assert r.status_code == 403 and "lacks the scope &#39;retrieve&#39;" in r.text


def test_worklist_resolve_updates_itself_then_retrieve_leads_to_the_retrieval(console):
    from sqlalchemy import update

    from app.db.models import Worklist, WorklistRow
    from app.devtools.orthanc import free_port

    c, _ = console
    sign_in(c)
    assert c.post("/api/v1/pacs-nodes", headers=BEARER, json={"name": "dead", "ae_title": "NOBODY",
                                                               "host": "127.0.0.1", "port": free_port()}).status_code == 201
    backoff = {"policy": {"backoff": {"initial_s": 0.05, "factor": 2.0, "max_s": 0.2}}}  # the node's etiquette, fast
    assert c.patch("/api/v1/pacs-nodes/dead", headers=BEARER, json=backoff).status_code == 200
    csrf = csrf_of(c, "/worklists")
    ok = c.post("/worklists/upload", data={"csrf_token": csrf},
                files={"file": ("uids.csv", b"StudyInstanceUID\n1.2.840.11\n1.2.840.12\n")})
    assert ok.status_code == 303
    url = ok.headers["location"]
    wid = int(url.rsplit("/", 1)[1])
    assert 'id="worklist-retrieve"' not in c.get(url).text  # nothing to retrieve before a resolve
    r = c.post(f"{url}/resolve", data={"csrf_token": csrf, "node": "nosuch"})
    assert r.status_code == 404 and "nosuch" in r.text and 'id="worklist-resolve"' in r.text
    r = c.post(f"{url}/resolve", data={"csrf_token": csrf, "node": "dead"})
    assert r.status_code == 303 and r.headers["location"] == url
    final = poll_until_final(c, f"{url}/live")
    assert final.count("s-refused") >= 2 and "PACS: " in final
    assert c.get(f"/api/v1/worklists/{wid}", headers=BEARER).json()["status"] in ("resolved", "failed")
    # while a worklist is resolving, its page polls its live part and offers no second resolve
    with c.ctx.sessions() as s:
        s.get(Worklist, wid).status = "resolving"
        s.commit()
    for got in (c.get(url).text, c.get(f"{url}/live", headers=POLL).text):
        assert f'<div id="worklist-live" data-poll="/worklists/{wid}/live"' in got
        assert 'id="worklist-resolve"' not in got and 'id="worklist-retrieve"' not in got
    # found rows (as a PACS would have answered), then the button starts one retrieval of their studies
    with c.ctx.sessions() as s:
        s.execute(update(WorklistRow).where(WorklistRow.worklist_id == wid, WorklistRow.row == 2)
                  .values(status="found", studies=["1.2.840.11"], detail=None))
        s.get(Worklist, wid).status = "resolved"
        s.commit()
    page = c.get(url).text
    assert 'id="worklist-retrieve"' in page
    r = c.post(f"{url}/retrieve", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"].startswith("/retrievals/")
    rid = int(r.headers["location"].rsplit("/", 1)[1])
    got = c.get(f"/api/v1/retrievals/{rid}", headers=BEARER).json()
    assert got["node"] == "dead" and got["query"] == {"StudyInstanceUID": "1.2.840.11"}
    assert f'href="/retrievals/{rid}"' in c.get(url).text


# ------------------------------------------------------------------ exports on the cohort page (issue #17)
def test_export_from_the_cohort_page_runs_to_done_downloads_and_deletes(console):
    import io
    import zipfile

    c, ids = console
    cid = ids["cohort"]
    sign_in(c)
    page = c.get(f"/cohorts/{cid}").text
    assert 'id="export-form"' in page and 'value="png"' in page and 'value="dicom"' not in page
    csrf = CSRF.search(page).group(1)
    # identified output is refused without export-identified, as the API refuses it (and audits it)
    r = c.post(f"/cohorts/{cid}/exports", data={"csrf_token": csrf, "format": "dicom"})
    assert r.status_code == 403 and "export-identified" in r.text
    r = c.post(f"/cohorts/{cid}/exports", data={"csrf_token": csrf, "format": "png", "image_size": "5"})
    assert r.status_code == 422 and "image_size" in r.text and 'value="5"' in r.text
    r = c.post(f"/cohorts/{cid}/exports", data={"csrf_token": csrf, "format": "png", "image_size": "32",
                                                "burned_in": "flag"})
    assert r.status_code == 303 and r.headers["location"] == f"/cohorts/{cid}#exports"
    eid = c.get("/api/v1/exports", headers=BEARER).json()["items"][0]["id"]
    assert c.get(f"/api/v1/exports/{eid}", headers=BEARER).json()["params"]["image_size"] == 32
    final = poll_until_final(c, f"/cohorts/{cid}/exports/live")
    assert f'id="export-{eid}"' in final and "s-done" in final, final
    link = f"/cohorts/{cid}/exports/{eid}/download"
    assert f'href="{link}"' in final
    got = c.get(link)
    assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(got.content)).namelist()
    assert "manifest.csv" in names and "dataset_card.json" in names and any(n.endswith(".png") for n in names)
    assert c.get(f"/cohorts/999/exports/{eid}/download").status_code == 404  # only through its own cohort
    # a read-only token sees the export, but no form, no download and no delete; posting is refused
    c.cookies.clear()
    sign_in(c, token=READER)
    page = c.get(f"/cohorts/{cid}").text
    assert f'id="export-{eid}"' in page and 'id="export-form"' not in page and f'href="{link}"' not in page
    r = c.post(f"/cohorts/{cid}/exports", data={"csrf_token": CSRF.search(page).group(1), "format": "png"})
    assert r.status_code == 403 and "lacks the scope &#39;export&#39;" in r.text
    # export-identified offers the identified format
    c.cookies.clear()
    sign_in(c, token=IDENT)
    assert 'value="dicom"' in c.get(f"/cohorts/{cid}").text
    # delete the files: the row stays, marked deleted, without a download link
    c.cookies.clear()
    sign_in(c)
    csrf = csrf_of(c, f"/cohorts/{cid}")
    r = c.post(f"/cohorts/{cid}/exports/{eid}/delete", data={"csrf_token": csrf})
    assert r.status_code == 303
    live = c.get(f"/cohorts/{cid}/exports/live", headers=POLL).text
    assert "s-deleted" in live and f'href="{link}"' not in live
    assert c.get(f"/api/v1/exports/{eid}", headers=BEARER).json()["status"] == "deleted"
    assert c.get(link).status_code == 409


def test_an_export_whose_process_died_stops_being_polled(console):
    """A running export whose process is gone and that no job will finish reads failed, as GET /exports/{id}
    says, so the cohort page's live part ends instead of polling for ever."""
    import socket
    import subprocess
    import sys

    from app.db.models import Export

    c, ids = console
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with c.ctx.sessions() as s:
        exp = Export(cohort_id=ids["cohort"], format="png", params={"format": "png", "image_size": 32},
                     status="running", done=3, total=24, report={"runner": f"{socket.gethostname()}:{gone.pid}"})
        s.add(exp)
        s.commit()
        eid = exp.id
    sign_in(c)
    live = c.get(f"/cohorts/{ids['cohort']}/exports/live", headers=POLL).text
    assert live.startswith('<div id="exports-live" data-final') and "interrupted" in live
    assert c.get(f"/api/v1/exports/{eid}", headers=BEARER).json()["status"] == "failed"
