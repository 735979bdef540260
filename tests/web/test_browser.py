"""The console in a real browser: Debian's headless Chromium driven by Selenium and Debian's chromedriver
(nothing downloaded: SE_OFFLINE, explicit binary and driver paths) against a real `radcohort serve`, a real
`radcohort worker` and a real Orthanc holding synthetic radiographs. One server set (module-scoped) serves
the tests below, in file order:

1. signs in, registers the PACS, echoes it, starts a retrieval and watches it finish without a reload,
   opens the index and an image, previews and saves a cohort, visits every page;
2. trains on that cohort from the /training form (a tiny CPU job), watches the epoch curve grow without a
   reload, checks Table 2, the confusion matrix and the misclassified gallery, follows a thumbnail to the
   image's labels, then classifies a DICOM file of the index on /models/{id};
3. every internal link of every page visited resolves.

Fails on a SEVERE browser console entry and on any request to a host other than 127.0.0.1. A screenshot of
each page goes to $RADCOHORT_SCREENSHOTS (default: the module's tmp dir, `screenshots/`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from app.demo.runner import child_env, radcohort_argv
from app.devtools.orthanc import OrthancServer, free_port, orthanc_binary
from tests.conftest import listening_process

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.worker]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "browser-test-token"
# a CPU try-out the form offers: small model, 32 px, few epochs (seconds on 2 cores)
TRAINING = {"model": "resnet10t", "image_size": "32", "epochs": "4", "batch_size": "8", "seed": "0"}


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


@dataclass
class Console:
    """The servers, the browser and what the tests found so far (the saved cohort, the visited pages)."""

    base: str
    driver: object
    watch: Watch
    shots: Path
    pacs: OrthancServer
    files: list[Path]
    worker: subprocess.Popen
    worker_log: Path
    visited: dict[str, str] = field(default_factory=dict)
    found: dict = field(default_factory=dict)

    def shot(self, name: str, url: str | None = None):
        """Screenshot the page; its URL (or `url`, for the answer to a POST) joins the link check."""
        self.driver.save_screenshot(str(self.shots / f"{len(list(self.shots.glob('*.png'))):02d}-{name}.png"))
        self.visited[url or self.driver.current_url] = name
        self.watch.drain()

    def text(self) -> str:
        # innerText read in one script call: no element reference to go stale while a page loads
        return self.driver.execute_script("return document.body ? document.body.innerText : ''") or ""

    def wait_text(self, text: str, timeout: float = 30):
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.3).until(lambda d: text in self.text())

    def fill(self, name: str, value: str):
        from selenium.webdriver.common.by import By

        el = self.driver.find_element(By.NAME, name)
        el.clear()
        el.send_keys(value)


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    from app.synth.generate import generate

    if not orthanc_binary():
        pytest.fail("Orthanc is not installed: run .ci/run or `apt-get install orthanc`")
    tmp = tmp_path_factory.mktemp("browser")
    shots = Path(os.environ.get("RADCOHORT_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    # a small synthetic PACS: 4 images per xr10 class (2 to train on, 2 to test: Table 2 gets its SDs)
    synth = tmp / "synth"
    generate(synth, per_class=4, seed=3, taxonomy="xr10", size="small", workers=2)
    api_port, scp_port = free_port(), free_port()
    pacs = OrthancServer(tmp / "orthanc", modalities={"radcohort": ("RADCOHORT", "127.0.0.1", scp_port)}, overrides={})
    pacs.start()
    env = child_env(dict(os.environ), tmp / "data", f"sqlite:///{tmp / 'rc.db'}", api_port, scp_port)
    env.update(RADCOHORT_API_TOKENS=f"tech:{TOKEN}:read+retrieve+train+export", RADCOHORT_AE_TITLE="RADCOHORT",
               RADCOHORT_PSEUDONYM_KEY="browser-test-key", RADCOHORT_SCP_PROCESSES="1", OMP_NUM_THREADS="2")
    worker_log = tmp / "worker.log"
    worker = None
    try:
        files = sorted(synth.rglob("*.dcm"))
        for f in files:
            pacs.upload(f)
        subprocess.run(radcohort_argv("db", "upgrade"), env=env, cwd=tmp, check=True, capture_output=True)
        with listening_process(radcohort_argv("serve"), env, api_port, cwd=tmp, what="radcohort serve"):
            # the training worker starts now: importing torch overlaps the retrieval test
            with open(worker_log, "wb") as out:
                worker = subprocess.Popen(radcohort_argv("worker", "--poll", "0.3"), env=env, cwd=tmp, stdout=out,
                                          stderr=subprocess.STDOUT)
            driver = _driver(tmp / "downloads")
            c = Console(f"http://127.0.0.1:{api_port}", driver, Watch(driver), shots, pacs, files, worker, worker_log)
            try:
                yield c
            finally:
                try:
                    c.watch.drain()
                finally:
                    driver.quit()
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        pacs.discard()


def test_retrieve_index_and_build_a_cohort(console):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    c, driver, pacs, files = console, console.driver, console.pacs, console.files
    # 1. sign in
    driver.get(c.base + "/")
    assert "/login" in driver.current_url
    c.shot("login")
    c.fill("token", TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    c.wait_text("Signed in as token:tech")
    c.shot("overview-empty")
    # 2. register the PACS node, echo it
    driver.find_element(By.LINK_TEXT, "PACS nodes").click()
    c.fill("name", "orthanc")
    c.fill("ae_title", pacs.aet)
    c.fill("host", "127.0.0.1")
    c.fill("port", str(pacs.dicom_port))
    driver.find_element(By.CSS_SELECTOR, "form[action='/nodes'] button[type=submit]").click()
    c.wait_text("PACS node orthanc registered")
    driver.find_element(By.ID, "echo").click()
    c.wait_text("C-ECHO ok")
    c.shot("node")
    # 3. retrieve everything the study dates cover; the page follows it without a reload
    driver.find_element(By.LINK_TEXT, "Retrieve from it").click()
    c.fill("StudyDate", "19000101-29991231")
    c.fill("Modality", "")
    driver.find_element(By.CSS_SELECTOR, "form[action='/retrievals'] button[type=submit]").click()
    c.wait_text("queued.")
    marker = driver.execute_script("document.body.dataset.noReload = 'yes'; return 1")
    assert marker == 1
    WebDriverWait(driver, 180, poll_frequency=0.5).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#retrieval-live[data-final]"))
    assert driver.execute_script("return document.body.dataset.noReload") == "yes", "the page was reloaded"
    live = driver.execute_script("return document.getElementById('retrieval-live').innerText")
    assert "completed" in live, live
    assert driver.execute_script("return document.getElementById('expected').innerText") == str(len(files))
    c.shot("retrieval")
    # 4. index with thumbnails
    driver.find_element(By.LINK_TEXT, "Index").click()
    c.wait_text(f"{len(files)} images match")
    _wait_images(driver, "img")
    c.shot("index")
    driver.find_element(By.LINK_TEXT, "details").click()
    c.wait_text("Labels")
    c.shot("instance")
    # 5. cohort: preview, then save
    driver.find_element(By.LINK_TEXT, "Cohorts").click()
    Select(driver.find_element(By.NAME, "taxonomy")).select_by_value("xr10")
    c.fill("test", "0.5")
    driver.find_element(By.CSS_SELECTOR, "button[value=preview]").click()
    c.wait_text("Preview:")
    c.shot("cohort-preview")
    driver.find_element(By.ID, "save-cohort").click()
    c.wait_text("saved")
    c.found["cohort"] = int(re.search(r"/cohorts/(\d+)$", urlsplit(driver.current_url).path).group(1))
    c.shot("cohort")
    # 6. export it from the cohort page (png, 32 px); the exports part follows it to done without a reload
    Select(driver.find_element(By.NAME, "format")).select_by_value("png")
    c.fill("image_size", "32")
    driver.find_element(By.CSS_SELECTOR, "#export-form button[type=submit]").click()
    c.wait_text("queued; its progress shows below")
    driver.execute_script("document.body.dataset.noReload = 'yes'")
    WebDriverWait(driver, 120, poll_frequency=0.5).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#exports-live[data-final] a.download"))
    assert driver.execute_script("return document.body.dataset.noReload") == "yes", "the page was reloaded"
    c.shot("cohort-export")
    # 7. the remaining pages
    for label in ("Training", "Models", "Overview", "PACS nodes", "Retrievals", "Worklists"):
        driver.find_element(By.LINK_TEXT, label).click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "nav a.here"))
        c.shot(label.lower().replace(" ", "-"))


def _wait_images(driver, selector: str, timeout: float = 30):
    """The images of `selector` in the viewport have loaded (lazy ones further down load only when shown)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.3).until(lambda d: d.execute_script(
        "var shown = Array.from(document.querySelectorAll(arguments[0])).filter(function (i) {"
        "  var r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < window.innerHeight; });"
        "return shown.length > 0 && shown.every(function (i) { return i.complete && i.naturalWidth > 0; })",
        selector))


def _curve_points(driver) -> int:
    """Epochs drawn in the live accuracy chart (0 before the first epoch ends)."""
    return driver.execute_script(
        "var s = document.querySelector('#training-live svg[data-points]');"
        "return s ? parseInt(s.getAttribute('data-points'), 10) : 0")


def test_train_from_the_form_then_classify_an_upload(console):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    c, driver = console, console.driver
    cohort = c.found.get("cohort")
    assert cohort, "the retrieval test saves the cohort this test trains on: run the module, not this test alone"
    # 1. start a job from the form
    driver.get(c.base + "/training")
    Select(driver.find_element(By.NAME, "cohort_id")).select_by_value(str(cohort))
    for name, value in TRAINING.items():
        c.fill(name, value)
    driver.find_element(By.CSS_SELECTOR, "form[action='/training'] button[type=submit]").click()
    c.wait_text("queued.")
    job_path = urlsplit(driver.current_url).path
    assert re.fullmatch(r"/training/\d+", job_path), driver.current_url
    # 2. the live curve grows while the page stays the same document
    driver.execute_script("document.body.dataset.noReload = 'yes'")
    assert driver.find_elements(By.CSS_SELECTOR, "#training-live[data-poll]"), "the new job's page does not poll"
    seen = [_curve_points(driver)]
    deadline = time.monotonic() + 150
    while not driver.find_elements(By.CSS_SELECTOR, "#training-live[data-final]"):
        assert time.monotonic() < deadline, f"training did not end: {c.worker_log.read_text()[-3000:]}"
        assert c.worker.poll() is None, f"the worker exited: {c.worker_log.read_text()[-3000:]}"
        seen.append(_curve_points(driver))
        time.sleep(0.3)
    seen.append(_curve_points(driver))
    assert driver.execute_script("return document.body.dataset.noReload") == "yes", "the page was reloaded"
    live = driver.execute_script("return document.getElementById('training-live').innerText")
    assert "completed" in live, live + c.worker_log.read_text()[-3000:]
    epochs = int(TRAINING["epochs"])
    assert seen[0] < epochs and seen[-1] == epochs, seen  # drawn by the poller, not at page load
    assert f"epoch {epochs} / {epochs}" in live
    # 3. Table 2: per class n, correct, accuracy, confidence mean ± SD
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "#table2 tbody tr")]
    assert len(rows) == 10, rows  # xr10
    for cls, n, correct, acc, conf in rows:
        assert cls and 0 <= int(correct) <= int(n), (cls, n, correct)
        if int(n) >= 2:  # the SD is of 2 images or more
            assert re.fullmatch(r"\d+\.\d %", acc) and re.fullmatch(r"[01]\.\d{3} ± \d\.\d{3}", conf), (cls, acc, conf)
    assert sum(int(r[1]) >= 2 for r in rows) >= 5, rows
    # the confusion matrix counts the same test images, one row and one column per class
    labels = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "table.cm thead th")][1:]
    matrix = [[int(td.text) for td in tr.find_elements(By.TAG_NAME, "td")]
              for tr in driver.find_elements(By.CSS_SELECTOR, "table.cm tbody tr")]
    assert len(matrix) == len(labels) and all(len(r) == len(labels) for r in matrix), (labels, matrix)
    assert sum(map(sum, matrix)) == sum(int(r[1]) for r in rows)
    wrong = sum(map(sum, matrix)) - sum(matrix[i][i] for i in range(len(labels)))
    # 4. the misclassified gallery: one tile per off-diagonal count, thumbnails that load
    tiles = driver.find_elements(By.CSS_SELECTOR, "#misclassified figure a.thumb")
    assert len(tiles) == min(wrong, 48) and wrong >= 1, (wrong, len(tiles))  # a 4-epoch 10-class model errs
    driver.execute_script("arguments[0].scrollIntoView()", tiles[0])
    _wait_images(driver, "#misclassified img")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.set_window_size(1366, 2000)  # the whole page: curves, Table 2, confusion matrix, galleries
    _wait_images(driver, "#misclassified img")
    c.shot("training-job")
    driver.set_window_size(1366, 900)
    model_link = driver.find_element(By.CSS_SELECTOR, "#training-live a[href^='/models/']").get_attribute("href")
    # 5. a thumbnail leads to the image's labels
    target = tiles[0].get_attribute("href")
    driver.execute_script("arguments[0].scrollIntoView()", tiles[0])
    tiles[0].click()
    c.wait_text("Labels")
    assert driver.current_url == target and "/instances/" in target
    labels_of_image = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
                       for tr in driver.find_elements(By.XPATH, "//h2[starts-with(., 'Labels')]/../table/tbody/tr")}
    assert labels_of_image.get("body part") not in (None, "", "—"), labels_of_image
    assert urlsplit(target).path.rsplit("/", 1)[1] in driver.find_element(By.TAG_NAME, "h1").text
    c.shot("misclassified-instance")
    # 6. /models/{id}: classify a file of the index; every class gets a probability
    driver.find_element(By.LINK_TEXT, "Models").click()
    driver.find_element(By.CSS_SELECTOR, f"a[href='{urlsplit(model_link).path}']").click()
    c.wait_text("Classify a DICOM file")
    model_page = driver.current_url
    driver.find_element(By.CSS_SELECTOR, "input[type=file][name=file]").send_keys(str(c.files[0]))
    driver.find_element(By.CSS_SELECTOR, "form[action$='/predict'] button[type=submit]").click()
    WebDriverWait(driver, 120, poll_frequency=0.5).until(lambda d: d.find_elements(By.ID, "prediction"))
    probs = {tr.find_element(By.TAG_NAME, "th").text: tr.find_element(By.TAG_NAME, "td").text
             for tr in driver.find_elements(By.CSS_SELECTOR, "#probabilities tbody tr")}
    assert set(probs) == set(labels), (probs, labels)
    values = [float(v.rstrip(" %")) for v in probs.values()]
    assert abs(sum(values) - 100) < 0.5 * len(values), probs  # each rounded to 0.1 %
    heading = driver.find_element(By.CSS_SELECTOR, "#prediction h3").text
    assert c.files[0].name in heading and any(k in heading for k in probs), heading
    c.shot("model-prediction", url=model_page)


def test_every_internal_link_resolves(console):
    from selenium.webdriver.common.by import By

    c, driver = console, console.driver
    assert len(c.visited) >= 12, sorted(c.visited.values())
    links: set[str] = set()
    for url in list(c.visited):
        driver.get(url)
        for a in driver.find_elements(By.CSS_SELECTOR, "a[href], img[src], link[href], script[src]"):
            target = a.get_attribute("href") or a.get_attribute("src")
            parts = urlsplit(urljoin(url, target))
            assert parts.hostname == "127.0.0.1", f"{url} links off-site: {target}"
            links.add(parts.path + (f"?{parts.query}" if parts.query else ""))
        c.watch.drain()
    with httpx.Client(base_url=c.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        broken = {link: r.status_code for link in sorted(links)
                  if link != "/docs" and (r := client.get(link)).status_code >= 400}
    assert not broken, f"broken links: {broken}"
    assert len(links) > 20
