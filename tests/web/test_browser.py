"""The console in a real browser: Debian's headless Chromium driven by Selenium and Debian's chromedriver
(nothing downloaded: SE_OFFLINE, explicit binary and driver paths) against a real `radcohort serve` and a
real Orthanc holding synthetic radiographs.

Signs in, registers the PACS, echoes it, starts a retrieval and watches it finish without a reload,
previews and saves a cohort, then visits every page. Fails on a SEVERE browser console entry, on any request
to a host other than 127.0.0.1, and on an internal link that does not resolve. A screenshot of each page goes
to $RADCOHORT_SCREENSHOTS (default: this test's tmp dir, `screenshots/`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from app.demo.runner import child_env, radcohort_argv
from app.devtools.orthanc import free_port
from tests.conftest import listening_process

pytestmark = [pytest.mark.slow, pytest.mark.orthanc]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "browser-test-token"


def _driver(downloads: Path):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/common.sh does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1366,900",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--metrics-recording-only", "--disable-features=Translate,OptimizationHints,MediaRouter"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


class Watch:
    """Console errors and every URL the pages requested, read from Chromium's logs after each step."""

    def __init__(self, driver):
        self.driver, self.severe, self.hosts = driver, [], set()

    def drain(self):
        for e in self.driver.get_log("browser"):
            if e.get("level") == "SEVERE":
                self.severe.append(e.get("message"))
        for e in self.driver.get_log("performance"):
            msg = json.loads(e["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                url = msg["params"]["request"]["url"]
                if url.startswith(("http:", "https:", "ws:", "wss:")):
                    self.hosts.add(urlsplit(url).hostname)
        assert not self.severe, f"browser console errors: {self.severe}"
        assert self.hosts <= {"127.0.0.1"}, f"requests to non-loopback hosts: {self.hosts - {'127.0.0.1'}}"


def test_console_in_a_real_browser(tmp_path, orthanc_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from app.synth.generate import generate

    shots = Path(os.environ.get("RADCOHORT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    # a small synthetic PACS: 2 images per xr10 class
    synth = tmp_path / "synth"
    generate(synth, per_class=2, seed=3, taxonomy="xr10", size="small", workers=2)
    api_port, scp_port = free_port(), free_port()
    pacs = orthanc_factory(modalities={"radcohort": ("RADCOHORT", "127.0.0.1", scp_port)})
    files = sorted(synth.rglob("*.dcm"))
    for f in files:
        pacs.upload(f)
    env = child_env(dict(os.environ), tmp_path / "data", f"sqlite:///{tmp_path / 'rc.db'}", api_port, scp_port)
    env.update(RADCOHORT_API_TOKENS=f"tech:{TOKEN}:read+retrieve+train+export", RADCOHORT_AE_TITLE="RADCOHORT",
               RADCOHORT_PSEUDONYM_KEY="browser-test-key", RADCOHORT_SCP_PROCESSES="1")
    import subprocess

    subprocess.run(radcohort_argv("db", "upgrade"), env=env, cwd=tmp_path, check=True, capture_output=True)
    base = f"http://127.0.0.1:{api_port}"
    with listening_process(radcohort_argv("serve"), env, api_port, cwd=tmp_path, what="radcohort serve"):
        driver = _driver(tmp_path / "downloads")
        watch = Watch(driver)
        visited: dict[str, str] = {}

        def shot(name: str):
            driver.save_screenshot(str(shots / f"{len(list(shots.glob('*.png'))):02d}-{name}.png"))
            visited[driver.current_url] = name
            watch.drain()

        def wait_text(text: str, timeout: float = 30):
            # innerText read in one script call: no element reference to go stale while a page loads
            WebDriverWait(driver, timeout, poll_frequency=0.3).until(
                lambda d: text in (d.execute_script("return document.body ? document.body.innerText : ''") or ""))

        def fill(name: str, value: str):
            el = driver.find_element(By.NAME, name)
            el.clear()
            el.send_keys(value)

        try:
            # 1. sign in
            driver.get(base + "/")
            assert "/login" in driver.current_url
            shot("login")
            fill("token", TOKEN)
            driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
            wait_text("Signed in as token:tech")
            shot("overview-empty")
            # 2. register the PACS node, echo it
            driver.find_element(By.LINK_TEXT, "PACS nodes").click()
            fill("name", "orthanc")
            fill("ae_title", pacs.aet)
            fill("host", "127.0.0.1")
            fill("port", str(pacs.dicom_port))
            driver.find_element(By.CSS_SELECTOR, "form[action='/nodes'] button[type=submit]").click()
            wait_text("PACS node orthanc registered")
            driver.find_element(By.ID, "echo").click()
            wait_text("C-ECHO ok")
            shot("node")
            # 3. retrieve everything the study dates cover; the page follows it without a reload
            driver.find_element(By.LINK_TEXT, "Retrieve from it").click()
            fill("StudyDate", "19000101-29991231")
            fill("Modality", "")
            driver.find_element(By.CSS_SELECTOR, "form[action='/retrievals'] button[type=submit]").click()
            wait_text("queued.")
            marker = driver.execute_script("document.body.dataset.noReload = 'yes'; return 1")
            assert marker == 1
            WebDriverWait(driver, 180, poll_frequency=0.5).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#retrieval-live[data-final]"))
            assert driver.execute_script("return document.body.dataset.noReload") == "yes", "the page was reloaded"
            live = driver.execute_script("return document.getElementById('retrieval-live').innerText")
            assert "completed" in live, live
            assert driver.execute_script("return document.getElementById('expected').innerText") == str(len(files))
            shot("retrieval")
            # 4. index with thumbnails
            driver.find_element(By.LINK_TEXT, "Index").click()
            wait_text(f"{len(files)} images match")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
            shot("index")
            driver.find_element(By.LINK_TEXT, "details").click()
            wait_text("Labels")
            shot("instance")
            # 5. cohort: preview, then save
            driver.find_element(By.LINK_TEXT, "Cohorts").click()
            Select(driver.find_element(By.NAME, "taxonomy")).select_by_value("xr10")
            driver.find_element(By.CSS_SELECTOR, "button[value=preview]").click()
            wait_text("Preview:")
            shot("cohort-preview")
            driver.find_element(By.ID, "save-cohort").click()
            wait_text("saved")
            shot("cohort")
            # 6. the remaining pages
            for label in ("Training", "Models", "Overview", "PACS nodes", "Retrievals"):
                driver.find_element(By.LINK_TEXT, label).click()
                WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "nav a.here"))
                shot(label.lower().replace(" ", "-"))
            # 7. every internal link of every visited page resolves (fetched with the API token)
            links: set[str] = set()
            for url in list(visited):
                driver.get(url)
                for a in driver.find_elements(By.CSS_SELECTOR, "a[href], img[src], link[href], script[src]"):
                    target = a.get_attribute("href") or a.get_attribute("src")
                    parts = urlsplit(urljoin(url, target))
                    assert parts.hostname == "127.0.0.1", f"{url} links off-site: {target}"
                    links.add(parts.path + (f"?{parts.query}" if parts.query else ""))
                watch.drain()
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
                broken = {link: r.status_code for link in sorted(links)
                          if link != "/docs" and (r := client.get(link)).status_code >= 400}
            assert not broken, f"broken links: {broken}"
            assert len(links) > 20
        finally:
            try:
                watch.drain()
            finally:
                driver.quit()
    assert len(list(shots.glob("*.png"))) >= 12
