"""The search page of `dualenc serve` in a real headless chromium (selenium): a typed query shows the service's own
ranking (mostly the digit asked for, with a briefly trained demo model), a dropped image finds itself first, "more
like this" changes the results and leaves the item out, the API key field and an error in the page."""

import base64
import json
import os
import shutil
import threading
import time

import httpx
import pytest

import dualenc
from dualenc import data, demo
from dualenc.search import index as search_index
from dualenc.serve import Limits, Service, create_app
from dualenc.train import loop as trainer
from test_serve import free_port

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("serve_browser")

KEY = "page-key"
STEPS = 400  # the demo's own training, shortened: enough for "seven" to find mostly sevens
TOP_K = 24  # the page's
WAIT_S = 30


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo model trained STEPS steps, the demo's held-out digits as files (data/images/test/NNNN.png and
    data/test.jsonl) and an index of them; returns (folder, labels by name, (config, params, processor))."""
    folder = tmp_path_factory.mktemp("serve_browser")
    train_set, processor, config, params = demo.build(str(folder / "vocab"), 0)
    test_set = data.load_digits("test", seed=0, image_size=demo.IMAGE_SIZE)
    run = trainer.TrainConfig(steps=STEPS, batch_size=demo.BATCH_SIZE, learning_rate=1e-3, seed=0,
                              max_length=demo.MAX_LENGTH)
    params, _ = trainer.fit(config, params, train_set, processor, run)
    demo.export(str(folder / "data"), {"test": test_set})
    rows = [json.loads(line) for line in (folder / "data/test.jsonl").read_text().splitlines()]
    labels = {row["image"]: row["label"] for row in rows}
    names = sorted(labels)
    embeds = dualenc.encode_images(params, config, processor, [folder / "data" / n for n in names], batch_size=128)
    with search_index.IndexWriter(folder / "digits.safetensors", config.projection_dim, "image",
                                  {"model_sha256": search_index.model_fingerprint(params)}) as writer:
        writer.add(embeds, names)
    return folder, labels, (config, params, processor)


@pytest.fixture(scope="module")
def base(digits):
    """The service (with an API key) on uvicorn in a thread, on a free loopback port; yields its URL."""
    import uvicorn

    folder, _, (config, params, processor) = digits
    service = Service(params, config, processor, name="demo", index=search_index.open_index(folder / "digits.safetensors"),
                      image_root=folder / "data", api_key=KEY, limits=Limits(timeout_s=60))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + WAIT_S
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(WAIT_S)


@pytest.fixture(scope="module")
def browser():
    """Headless chromium through chromedriver (both must be installed: .ci/run installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    assert binary and driver, "chromium and chromedriver must be installed (apt install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --disable-dev-shm-usage: containers often give /dev/shm 64 MB, where chromium crashes
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=DriverService(driver))
    yield chrome
    chrome.quit()


def api_search(base_url: str, query) -> list[str]:
    answer = httpx.post(base_url + "/v1/search", json={"query": query, "top_k": TOP_K},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return [r["name"] for r in answer.json()["results"]]


def open_page(browser, base_url: str, key: str = KEY):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(base_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(base_url + "/")
    box = browser.find_element(By.ID, "keybox")
    WebDriverWait(browser, WAIT_S).until(lambda _: box.is_displayed())  # the service asks for a key
    browser.find_element(By.ID, "key").send_keys(key)


def searched(browser, count: int) -> list[str]:
    """Waits for the page's count-th search to finish; the names in its grid, in order."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script("return document.body.dataset.searches") == str(count))
    return browser.execute_script("return [...document.querySelectorAll('#results li')].map(li => li.dataset.name)")


def screenshot(browser, tmp_path, name: str) -> None:
    browser.save_screenshot(str(tmp_path / name))
    assert (tmp_path / name).stat().st_size > 0
    if os.environ.get("DUALENC_SCREENSHOT"):
        browser.save_screenshot(os.environ["DUALENC_SCREENSHOT"])


def test_a_typed_query_shows_the_services_ranking_of_mostly_that_digit(browser, base, digits, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, labels, _ = digits
    open_page(browser, base)
    query = "a photo of the digit seven"
    browser.find_element(By.ID, "q").send_keys(query, Keys.ENTER)  # submitted from the keyboard
    shown = searched(browser, 1)
    assert shown == api_search(base, query)
    assert sum(labels[n] == "seven" for n in shown[:8]) >= 6, [labels[n] for n in shown[:8]]
    assert browser.execute_script("return sessionStorage.getItem('dualenc-api-key')") == KEY
    pictures = browser.find_elements(By.CSS_SELECTOR, "#results li img")
    assert [p.get_attribute("alt") for p in pictures] == shown
    WebDriverWait(browser, WAIT_S).until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('#results img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)"))
    assert "results for" in browser.find_element(By.ID, "status").text
    screenshot(browser, tmp_path, "serve-page.png")


def test_a_dropped_image_finds_itself_and_more_like_this_leaves_it_out(browser, base, digits):
    from selenium.webdriver.common.by import By

    folder, labels, _ = digits
    name = sorted(labels)[5]
    raw = base64.b64encode((folder / "data" / name).read_bytes()).decode()
    open_page(browser, base)
    browser.execute_script("""
        const [b64, name] = arguments;
        const file = new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: "image/png"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, raw, os.path.basename(name))
    shown = searched(browser, 1)
    assert shown[0] == name  # its own index row
    assert shown == api_search(base, {"image": "data:image/png;base64," + raw})
    browser.find_elements(By.CSS_SELECTOR, "#results li button.more")[0].click()
    alike = searched(browser, 2)
    assert name not in alike and alike != shown and len(alike) == TOP_K
    assert alike == api_search(base, {"item": name})


def test_an_error_is_shown_in_the_page(browser, base):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, base, key="wrong")
    browser.find_element(By.ID, "q").send_keys("the digit one", Keys.ENTER)
    assert searched(browser, 1) == []
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "a valid API key is required" in error.text
