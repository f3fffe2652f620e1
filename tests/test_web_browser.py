"""The chat page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
selenium): it loads, sends a message, shows the reply as it streams, regenerates it, shows tool
calls apart from text, and renders a non-blank screenshot on a phone-sized screen without sideways scrolling."""
import shutil
import time

import pytest

from test_web import model, scheduler, server, tokenizer  # noqa: F401 (session fixtures)

webdriver = pytest.importorskip("selenium.webdriver")
Image = pytest.importorskip("PIL.Image")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                 reason="no chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 800, "pixelRatio": 1}})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


RECORD_LENGTHS = """
window.lengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.assistant .text');
  if (replies.length) window.lengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('chat'), {subtree: true, childList: true, characterData: true});
"""


def test_chat_page_streams_regenerates_and_renders(browser, server, tmp_path):
    by = webdriver.common.by.By
    browser.get(server + "/")
    assert browser.title == "nanochat-jax"
    browser.execute_script(RECORD_LENGTHS)
    idle = lambda: browser.find_element(by.ID, "stop").get_attribute("hidden") is not None
    reply = lambda: browser.find_elements(by.CSS_SELECTOR, ".assistant .text")

    browser.find_element(by.ID, "input").send_keys("Tell me about whales")
    browser.find_element(by.ID, "send").click()
    wait_for(lambda: reply() and idle() and browser.find_elements(by.CSS_SELECTOR, "button.regenerate"))
    first = reply()[-1].text
    assert first and not browser.find_elements(by.CSS_SELECTOR, ".error")
    lengths = browser.execute_script("return window.lengths")
    assert len({n for n in lengths if 0 < n < len(first)}) >= 2, lengths  # it grew piece by piece

    browser.find_element(by.CSS_SELECTOR, "button.regenerate").click()
    wait_for(lambda: idle() and browser.find_elements(by.CSS_SELECTOR, "button.regenerate"))
    assert len(reply()) == 1 and reply()[-1].text and reply()[-1].text != first  # sampled afresh

    browser.find_element(by.CSS_SELECTOR, "button.edit").click()
    assert browser.find_element(by.ID, "input").get_attribute("value") == "Tell me about whales"
    assert not browser.find_elements(by.CSS_SELECTOR, ".msg")

    browser.execute_script("""
        const box = document.createElement('div'); box.id = 'tooltest'; document.getElementById('chat').append(box);
        renderText(box, 'so <|python_start|>1+3<|python_end|><|output_start|>4<|output_end|> it is');""")
    assert browser.find_element(by.CSS_SELECTOR, "#tooltest .tool.call").text.endswith("1+3")
    assert browser.find_element(by.CSS_SELECTOR, "#tooltest .tool.output").text.endswith("4")

    browser.find_element(by.ID, "input").send_keys(" again")
    browser.find_element(by.ID, "send").click()
    wait_for(lambda: reply() and idle() and browser.find_elements(by.CSS_SELECTOR, "button.regenerate"))
    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    image = Image.open(shot).convert("RGB")
    assert browser.execute_script("return [innerWidth, document.documentElement.scrollWidth]") == [390, 390]
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 20 and max(count for count, _ in colors) < 0.98 * image.width * image.height
