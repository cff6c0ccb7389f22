"""`xmei serve`: the page in a real browser, the API through gradio_client, and bad input.

One server for the module: `xmei serve` in its own process on a free port, with the trained
tiny checkpoint beside an earlier one (two columns), its console kept in a file. The browser is
Debian's chromium driven by Selenium through Debian's chromedriver (both installed when missing,
as root); nothing is fetched from outside, which the browser's own network log shows.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import EARLIER, LAST, debian_program
from faults import XMEI, xmei

MAX_SECONDS = 8  # serve.max_seconds of the test server: the corpus' clips last 1 to 6 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """(URL, console log) of `xmei serve` on the last and an earlier checkpoint."""
    log = tmp_path_factory.mktemp("serve") / "console.log"
    port = free_port()
    args = [str(XMEI), "serve", "--checkpoint", str(trained_run / LAST), "--checkpoint", str(trained_run / EARLIER),
            "--port", str(port), "--set", f"serve.max_seconds={MAX_SECONDS}"]
    env = {**{k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as console:
        process = subprocess.Popen(args, stdout=console, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"xmei serve did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
    yield url, log
    os.killpg(process.pid, signal.SIGTERM)  # a scheduler's stop; Ctrl-C is Gradio's own (and ignored in
    try:                                    # a background job, as this suite may be)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("xmei serve did not stop within 30 s of SIGTERM")


@pytest.fixture(scope="module")
def clips(corpus, tmp_path_factory) -> dict[str, Path]:
    """A corpus clip with its own audio track, one without audio, one too long, and a text file named .mp4."""
    from pipeline.decode import read_audio
    from pipeline.synth import write_camera_mp4, write_mp4

    folder = tmp_path_factory.mktemp("clips")
    videos = sorted((corpus / "videos").glob("*.mp4"))
    heard = next(v for v in videos if read_audio(None, v) is not None)
    frames = np.random.default_rng(0).integers(0, 255, (20, 64, 64, 3), dtype=np.uint8)
    write_mp4(folder / "silent.mp4", frames, 10, None)
    write_camera_mp4(folder / "long.mp4", 64, 48, 10, MAX_SECONDS + 2, 16000)
    (folder / "notes.mp4").write_text("this is a text file, not a video\n")
    return {"clip": heard, "silent": folder / "silent.mp4", "long": folder / "long.mp4",
            "text": folder / "notes.mp4"}


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def ask(client, video: Path, subtitle: str = "Well, the train was late.") -> list[dict]:
    from gradio_client import handle_file

    return client.predict(handle_file(str(video)), subtitle, "", "", api_name="/predict")


# ----------------------------------------------------------------------------- the API

def test_the_api_answers_as_the_python_api_does(client, clips, trained_run):
    """Each checkpoint's answer through gradio_client is the Predictor's on the same clip and subtitle."""
    from xmei import Predictor

    answers = ask(client, clips["clip"])
    assert [a["name"] for a in answers] == ["run/step_0000006", "run/step_0000003"]
    for answer, folder in zip(answers, (LAST, EARLIER)):
        expected = Predictor.from_checkpoint(trained_run / folder).predict(clips["clip"], "Well, the train was late.")
        for key in ("emotion", "intent", "explanation", "text", "has_audio", "subtitle"):
            assert answer[key] == getattr(expected, key), key
        for kind in ("emotion_probs", "intent_probs"):
            assert answer[kind].keys() == getattr(expected, kind).keys()
            assert np.allclose(list(answer[kind].values()), list(getattr(expected, kind).values()), atol=1e-5)
        for group, weights in expected.visual_attention.items():  # (F, P, P) over the sampled frames
            assert np.allclose(answer["visual_attention"][group], weights, atol=1e-5)
        assert answer["audio_attention"].keys() == expected.audio_attention.keys() != set()
        assert answer["subtitle_source"] == "given" and answer["checkpoint"] == str(trained_run / folder)


def test_bad_input_is_a_message_and_the_server_keeps_serving(client, clips, server):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="notes.mp4 is not a video this server can read"):
        ask(client, clips["text"])
    with pytest.raises(AppError, match=rf"long.mp4 is 1\d.\d s long; this server takes clips up to {MAX_SECONDS} s "
                                       r"\(serve.max_seconds\)"):
        ask(client, clips["long"])
    assert {a["has_audio"] for a in ask(client, clips["silent"])} == {False}
    answers = ask(client, clips["silent"], subtitle="")
    assert all("no subtitle: the model answered without one" in a["notes"] for a in answers)
    assert all(any(n.startswith("no audio: the clip has no audio track") for n in a["notes"]) for a in answers)
    assert {a["subtitle_source"] for a in answers} == {"none"}
    assert [a["emotion"] for a in ask(client, clips["clip"])]  # still serving
    console = server[1].read_text()
    assert "Traceback" not in console and "refused notes.mp4: notes.mp4 is not a video" in console
    assert "refused long.mp4" in console


def test_two_requests_at_once_are_both_answered_as_one_alone(client, server, clips):
    """Requests queue (one generation at a time on the device); each gets its own clip's answer."""
    from gradio_client import Client

    alone = {name: ask(client, clips[name]) for name in ("clip", "silent")}
    together: dict[str, list[dict]] = {}

    def run(name: str) -> None:
        together[name] = ask(Client(server[0], verbose=False), clips[name])

    threads = [threading.Thread(target=run, args=(name,)) for name in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for name, answers in alone.items():
        assert [(a["emotion"], a["intent"], a["explanation"]) for a in together[name]] == \
            [(a["emotion"], a["intent"], a["explanation"]) for a in answers], name


def test_serve_refuses_a_port_in_use_and_a_damaged_checkpoint_before_loading(server, trained_run, tmp_path):
    port = server[0].rstrip("/").rsplit(":", 1)[1]
    done = xmei("serve", "--checkpoint", trained_run / LAST, "--port", port)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    done = xmei("serve", "--checkpoint", tmp_path / "nowhere", "--port", str(free_port()))
    assert done.returncode == 1 and "nowhere does not exist" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the page in a browser

@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = debian_program("chromium", "chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1200",
                     "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):  # a webcam
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(debian_program("chromedriver", "chromium-driver")), options=options)
    yield driver
    driver.quit()


def open_page(browser, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#clip input[type=file]"))


def upload(browser, video: Path) -> str:
    """The page's status once the clip is uploaded through its own file input and its subtitle looked for."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "#clip input[type=file]").send_keys(str(video))
    WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "status").text.strip())
    return browser.find_element(By.ID, "status").text


def shoot(browser, path: Path) -> None:
    """A screenshot of the whole page."""
    browser.set_window_size(1400, browser.execute_script("return document.documentElement.scrollHeight") + 50)
    time.sleep(0.5)
    browser.save_screenshot(str(path))
    browser.set_window_size(1400, 1200)


def test_the_page_answers_an_uploaded_clip_with_its_evidence(server, browser, clips, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server[0])
    assert "subtitle from speech recognition" in upload(browser, clips["clip"])  # the tiny Whisper's transcript
    heard = browser.find_element(By.CSS_SELECTOR, "#subtitle textarea").get_attribute("value")
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 180).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#json-1 a[download]")) == 1)
    shoot(browser, tmp_path / "answered.png")
    expected = ask(client, clips["clip"], heard)  # the same request through the API
    for index, answer in enumerate(expected):
        for kind in ("emotion", "intent"):
            box = browser.find_element(By.CSS_SELECTOR, f"#labels-{index} .xmei-labels[data-kind={kind}]")
            assert box.find_element(By.CLASS_NAME, "xmei-label").text == answer[kind]
            bars = {b.get_attribute("data-label"): float(b.get_attribute("data-p"))
                    for b in box.find_elements(By.CLASS_NAME, "xmei-bar")}
            assert bars.keys() == answer[f"{kind}_probs"].keys()  # a bar per label
            assert np.allclose([bars[k] for k in bars], [answer[f"{kind}_probs"][k] for k in bars], atol=1e-5)
            assert box.find_element(By.CLASS_NAME, "xmei-answer").get_attribute("data-label") == answer[kind]
        text = browser.find_element(By.CSS_SELECTOR, f"#explanation-{index} textarea").get_attribute("value")
        assert text == answer["explanation"] and text
        images = browser.find_elements(By.CSS_SELECTOR, f"#evidence-{index} img")
        assert [i.get_attribute("alt") for i in images] == ["frames", "audio"]
        assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
        link = browser.find_element(By.CSS_SELECTOR, f"#json-{index} a[download]").get_attribute("href")
        downloaded = json.loads(urllib.request.urlopen(link).read())
        assert (downloaded["emotion"], downloaded["intent"], downloaded["subtitle"]) == \
            (answer["emotion"], answer["intent"], heard) and downloaded["subtitle_source"] == "asr"
        assert downloaded["visual_attention"].keys() == answer["visual_attention"].keys()
    outside = {event["params"]["request"]["url"] for event in map(lambda e: json.loads(e["message"])["message"],
                                                                   browser.get_log("performance"))
               if event["method"] == "Network.requestWillBeSent"}
    outside = {u for u in outside if not u.startswith((server[0], "data:", "blob:"))}
    assert not outside, f"the page fetched from outside: {sorted(outside)[:5]}"


def test_the_page_says_a_renamed_text_file_is_no_video(server, browser, clips, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    said = "notes.mp4 is not a video this server can read (cannot read the video: Invalid data found"
    open_page(browser, server[0])
    assert said in upload(browser, clips["text"])  # at once, when no subtitle can be made
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 60).until(lambda b: any(said in t.text for t in b.find_elements(By.CSS_SELECTOR,
                                                                                        ".toast-body")))
    shoot(browser, tmp_path / "refused.png")
    assert said in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.CSS_SELECTOR, "a[download]")  # no answer
    assert "Traceback" not in server[1].read_text()


def test_the_page_answers_a_clip_recorded_from_the_webcam(server, browser):
    """Chromium's fake camera and microphone, recorded through the page's own buttons (a WebM)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server[0])
    browser.find_element(By.CSS_SELECTOR, "#clip button[aria-label='Capture from camera']").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(
        By.XPATH, "//*[@id='clip']//button[contains(., 'Click to Access Webcam')]"))[0].click()
    record = WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#clip button[aria-label='start recording']"))[0]
    record.click()
    time.sleep(2)
    record.click()  # stop: the recording is uploaded, then its subtitle looked for
    WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "status").text.strip())
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 180).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#json-1 a[download]")) == 1)
    answer = json.loads(urllib.request.urlopen(
        browser.find_element(By.CSS_SELECTOR, "#json-0 a[download]").get_attribute("href")).read())
    assert answer["video"].endswith(".webm") and answer["has_audio"]  # the fake microphone's beeps
    assert answer["emotion"] in answer["emotion_probs"] and answer["explanation"] is not None
