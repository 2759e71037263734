"""The playground in a real headless browser (Debian's chromium and chromedriver, driven by
selenium): type a prompt, generate, select a token, read the distribution's bars, move the
temperature, see the attention heatmap and an embedding table, and save a screenshot
(SERVE_SCREENSHOT=path keeps a copy); in chat mode, hold a two-turn conversation whose replies
are shaded and clickable the same way (SERVE_CHAT_SCREENSHOT=path keeps its screenshot).

Skipped, saying why, where selenium, chromium or chromedriver is missing; CI installs them
(apt-get install chromium chromium-driver) and sets SMALLGPT_REQUIRE_BROWSER=1, under which a
missing browser fails these tests instead: CI must not pass without running them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (fastapi, uvicorn)")

httpx = pytest.importorskip("httpx", reason="the browser tests compare with the API over httpx")

from serve_server import failing_generate, load, running_server, train_tiny  # noqa: E402

from model.serve import pages  # noqa: E402

try:  # imported here, not skipped at once: under SMALLGPT_REQUIRE_BROWSER its absence fails
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

REQUIRED = os.environ.get("SMALLGPT_REQUIRE_BROWSER", "") not in ("", "0")


def find(names: list[str], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((p for p in (shutil.which(n) for n in names) if p), None)


CHROMIUM = find(["chromium", "chromium-browser", "google-chrome"], "CHROMIUM")
CHROMEDRIVER = find(["chromedriver"], "CHROMEDRIVER")
MISSING = ("selenium is not installed (pip install selenium)" if webdriver is None else
           "no headless browser: install Debian's chromium and chromium-driver (or set "
           "CHROMIUM and CHROMEDRIVER to their paths)" if CHROMIUM is None or CHROMEDRIVER is None
           else None)


def unavailable(reason: str) -> NoReturn:
    """Skip, saying why; under SMALLGPT_REQUIRE_BROWSER (CI) fail instead."""
    if REQUIRED:
        pytest.fail(f"{reason}; SMALLGPT_REQUIRE_BROWSER is set, so the browser tests must run",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    # Autouse and module-scoped: it runs before the server fixture trains a model.
    if MISSING:
        unavailable(MISSING)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pretrained = load(train_tiny(tmp_path_factory.mktemp("browser")))
    with running_server(pretrained, "tiny") as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        unavailable(f"chromium did not start: {exc.msg}")
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def by_id(testid: str) -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{testid}"]'


def bar_probs(driver) -> list[float]:
    bars = driver.find_element(*by_id("distribution")).find_elements(*by_id("bar"))
    return [float(b.get_attribute("data-prob")) for b in bars]


def open_and_generate(driver, server: str, prompt: str, context: int = 32, chat: bool = False,
                      **fields: str) -> WebDriverWait:
    """Load the page, type `prompt` (and fields such as max-tokens by test id), press Generate
    (in chat mode: Send)."""
    wait = WebDriverWait(driver, 30)
    driver.get(server + "/")
    wait.until(lambda d: f"context {context} tokens" in d.find_element(*by_id("model-info")).text)
    if chat:
        driver.find_element(*by_id("mode-chat")).click()
    type_and_send(driver, prompt, **fields)
    return wait


def type_and_send(driver, prompt: str, **fields: str) -> None:
    for testid, value in (("prompt", prompt), *fields.items()):
        box = driver.find_element(*by_id(testid))
        box.clear()
        box.send_keys(value)
    driver.find_element(*by_id("generate")).click()


def test_generate_select_a_token_move_the_temperature(server, browser, tmp_path: Path):
    driver = browser
    wait = open_and_generate(driver, server, "to be or not", **{"max-tokens": "30", "seed": "1"})
    wait.until(lambda d: "tokens generated" in d.find_element(*by_id("status")).text)
    tokens = driver.find_element(*by_id("output")).find_elements(*by_id("token"))
    assert len(tokens) == 30
    assert len(driver.find_elements(*by_id("prompt-token"))) == len("to be or not")
    assert all(0 < float(t.get_attribute("data-prob")) <= 1 for t in tokens)

    tokens[4].click()
    wait.until(lambda d: "softmax" in d.find_element(By.ID, "distribution-caption").text)
    before = bar_probs(driver)
    assert len(before) >= 3 and sum(before) == pytest.approx(1.0, abs=1e-3)
    picked = driver.find_element(*by_id("distribution")).find_elements(By.CSS_SELECTOR,
                                                                          ".bar-row.picked")
    assert len(picked) == 1

    slider = driver.find_element(*by_id("temperature"))
    for _ in range(12):  # 0.80 -> 1.40, one keyboard step (0.05) at a time, as a user would
        slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.find_element(*by_id("distribution")).get_attribute(
        "data-temperature") == "1.4")
    after = bar_probs(driver)
    assert sum(after) == pytest.approx(1.0, abs=1e-3)
    assert after != before and after[0] < before[0]  # a higher temperature flattens

    wait.until(lambda d: d.find_element(*by_id("attention")).get_attribute("data-cells")
               == str(len("to be or not") ** 2))
    canvas = driver.find_element(By.CSS_SELECTOR, '[data-testid="attention"] canvas')
    assert canvas.size["width"] > 100 and canvas.size["height"] > 100
    head = driver.find_element(*by_id("attention-head"))
    head.find_elements(By.TAG_NAME, "option")[2].click()  # head 1
    wait.until(lambda d: d.find_element(*by_id("attention")).get_attribute("data-head") == "1")

    word = driver.find_element(*by_id("neighbors-word"))
    word.clear()
    word.send_keys("e")
    driver.find_element(*by_id("neighbors-go")).click()
    wait.until(lambda d: d.find_element(*by_id("embeddings-result")).find_elements(
        By.TAG_NAME, "tr"))
    tokens[4].click()  # the distribution panel shown in the screenshot
    shot = tmp_path / "playground.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("SERVE_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["SERVE_SCREENSHOT"])


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """A model with room for a few turns of the chat template (a char model: ~25 tokens of
    template for one short exchange)."""
    pretrained = load(train_tiny(tmp_path_factory.mktemp("browser-chat"), block_size=96))
    with running_server(pretrained, "tiny-chat") as (url, _):
        yield url


def turns(driver, role: str) -> list:
    return driver.find_element(*by_id("output")).find_elements(*by_id(f"turn-{role}"))


def reply_text(turn) -> str:
    shown = "".join(t.get_attribute("textContent") for t in turn.find_elements(*by_id("token")))
    return shown.replace("↵\n", "\n")


def test_chat_mode_a_conversation_with_shaded_clickable_replies(chat_server, browser,
                                                                tmp_path: Path):
    driver = browser
    wait = open_and_generate(driver, chat_server, "to be", context=96, chat=True,
                             **{"max-tokens": "12", "seed": "1"})
    assert driver.find_element(*by_id("system")).is_displayed()
    assert driver.find_element(*by_id("generate")).text == "Send"
    wait.until(lambda d: "tokens generated" in d.find_element(*by_id("status")).text)
    assert [t.text.split("\n", 1)[-1] for t in turns(driver, "user")] == ["to be"]
    first = turns(driver, "assistant")
    assert len(first) == 1
    tokens = first[0].find_elements(*by_id("token"))
    assert 1 <= len(tokens) <= 12 and all(0 < float(t.get_attribute("data-prob")) <= 1
                                          for t in tokens)
    assert not driver.find_elements(*by_id("prompt-token"))  # turns, not the template's tokens
    # The page sent the conversation through the server's template: the API gives the same
    # reply for the same settings.
    api = httpx.post(f"{chat_server}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "to be"}], "max_tokens": 12, "seed": 1,
        "temperature": 0.8}).json()
    assert reply_text(first[0]) == api["choices"][0]["message"]["content"]

    type_and_send(driver, "or not")
    wait.until(lambda d: len(turns(d, "assistant")) == 2 and
               d.find_element(*by_id("generate")).is_enabled())
    assert [t.text.split("\n", 1)[-1] for t in turns(driver, "user")] == ["to be", "or not"]
    assert driver.find_element(*by_id("prompt")).get_attribute("value") == ""

    # A token of the first reply still opens its distribution, and the temperature what-if.
    first[0].find_elements(*by_id("token"))[0].click()
    wait.until(lambda d: "softmax" in d.find_element(By.ID, "distribution-caption").text)
    before = bar_probs(driver)
    assert sum(before) == pytest.approx(1.0, abs=1e-3)
    slider = driver.find_element(*by_id("temperature"))
    for _ in range(8):  # 0.80 -> 1.20
        slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.find_element(*by_id("distribution")).get_attribute(
        "data-temperature") == "1.2")
    after = bar_probs(driver)
    assert after != before and sum(after) == pytest.approx(1.0, abs=1e-3)
    turns(driver, "assistant")[1].find_elements(*by_id("token"))[0].click()
    wait.until(lambda d: "step 0" in d.find_element(By.ID, "distribution-caption").text)
    shot = tmp_path / "chat.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("SERVE_CHAT_SCREENSHOT"):
        shutil.copy(shot, os.environ["SERVE_CHAT_SCREENSHOT"])

    driver.find_element(*by_id("chat-reset")).click()
    assert not turns(driver, "assistant") and not turns(driver, "user")
    driver.find_element(*by_id("mode-completion")).click()
    assert not driver.find_element(*by_id("system")).is_displayed()


def test_errors_show_in_the_page(server, browser):
    driver = browser
    # Capitals are not in the tiny model's char vocabulary.
    wait = open_and_generate(driver, server, "ROMEO")
    wait.until(lambda d: "vocabulary" in d.find_element(*by_id("status")).text)
    assert "error" in driver.find_element(*by_id("status")).get_attribute("class")
    assert driver.find_element(*by_id("generate")).is_enabled()


def test_a_failure_mid_stream_shows_in_the_page(server, browser, monkeypatch):
    """The stream's "error" event: the page says generation failed, in red, and keeps the
    tokens that came before it."""
    monkeypatch.setattr(pages, "generate", failing_generate(3, RuntimeError("a bug")))
    driver = browser
    wait = open_and_generate(driver, server, "to be")
    wait.until(lambda d: "failed" in d.find_element(*by_id("status")).text)
    status = driver.find_element(*by_id("status"))
    assert "after 3 tokens" in status.text and "internal server error" in status.text
    assert "error" in status.get_attribute("class")
    assert len(driver.find_element(*by_id("output")).find_elements(*by_id("token"))) == 3
    assert driver.find_element(*by_id("generate")).is_enabled()


# -- the walk: one prediction, step by step ---------------------------------------------------
def walk_steps(driver) -> list:
    return driver.find_element(*by_id("walk")).find_elements(*by_id("walk-step"))


def current_step(driver):
    """The one step shown, which is also the one marked aria-current."""
    steps = walk_steps(driver)
    shown = [s for s in steps if s.is_displayed()]
    marked = [s for s in steps if s.get_attribute("aria-current") == "step"]
    assert len(shown) == 1 and shown == marked
    return shown[0]


def stage_of(driver) -> str:
    return current_step(driver).get_attribute("data-stage")


def expected_stages(n_layer: int) -> list[str]:
    return ["tokens", "embedding", "position", *["attention", "mlp"] * n_layer, "unembedding",
            "softmax", "sample"]


def start_walk(driver, server: str, prompt: str, context: int, **fields: str) -> WebDriverWait:
    """Load the page, fill the prompt (and fields by test id), press Walk the prompt. The wait
    it returns looks again when a walk redraws its steps under it."""
    from selenium.common.exceptions import StaleElementReferenceException

    wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
    driver.get(server + "/")
    wait.until(lambda d: f"context {context} tokens" in d.find_element(*by_id("model-info")).text)
    for testid, value in (("prompt", prompt), *fields.items()):
        box = driver.find_element(*by_id(testid))
        box.clear()
        box.send_keys(value)
    driver.find_element(*by_id("walk-start")).click()
    wait.until(lambda d: walk_steps(d) and stage_of(d) == "tokens")
    return wait


def step_forward_to(driver, wait: WebDriverWait, stage: str) -> None:
    while stage_of(driver) != stage:
        index = walk_steps(driver).index(current_step(driver))
        driver.find_element(*by_id("walk-next")).click()
        wait.until(lambda d, after=index + 1: walk_steps(d).index(current_step(d)) == after)


def walk_top_at_temperature_1(driver, wait: WebDriverWait, start: float) -> list[tuple]:
    """The softmax step's five walk-top rows after moving its slider from `start` to 1."""
    slider = driver.find_element(*by_id("walk-temperature"))
    for _ in range(round((1 - start) / 0.05)):
        slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: current_step(d).find_element(By.CLASS_NAME, "distribution")
               .get_attribute("data-temperature") == "1")
    rows = current_step(driver).find_elements(*by_id("walk-top"))
    return [(r.get_attribute("data-token"), float(r.get_attribute("data-prob"))) for r in rows]


def api_top(server: str, prompt: str) -> list[tuple]:
    """The five likeliest next tokens and their probabilities from /v1/completions."""
    import math

    reply = httpx.post(f"{server}/v1/completions", timeout=30, json={
        "prompt": prompt, "max_tokens": 1, "logprobs": 5, "temperature": 1}).json()
    top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
    return [(t, math.exp(lp)) for t, lp in sorted(top.items(), key=lambda kv: -kv[1])[:5]]


def assert_same_top(page: list[tuple], api: list[tuple]) -> None:
    assert [t for t, _ in page] == [t for t, _ in api]
    assert [p for _, p in page] == pytest.approx([p for _, p in api], rel=1e-4, abs=1e-6)


def test_walk_a_prediction_step_by_step_and_append_the_token(server, browser, tmp_path: Path):
    driver = browser
    prompt = "to be or not"
    wait = start_walk(driver, server, prompt, 32, seed="4")
    assert [s.get_attribute("data-stage") for s in walk_steps(driver)] == expected_stages(2)
    chips = current_step(driver).find_element(By.CLASS_NAME, "walk-tokens")
    assert chips.get_attribute("data-count") == str(len(prompt))
    assert driver.find_element(*by_id("walk-prev")).get_attribute("disabled")

    driver.find_element(*by_id("walk-next")).click()
    wait.until(lambda d: stage_of(d) == "embedding")
    assert "one-hot" in current_step(driver).text and "GPT-3" in current_step(driver).text
    driver.find_element(*by_id("walk-prev")).click()
    wait.until(lambda d: stage_of(d) == "tokens")
    shots = {}
    for stage in ("embedding", "attention", "softmax"):
        step_forward_to(driver, wait, stage)
        step = current_step(driver)
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", step)
        shots[stage] = step.screenshot_as_png

    # The softmax step at temperature 1 lists what /v1/completions gives for the same prompt.
    assert_same_top(walk_top_at_temperature_1(driver, wait, 0.8), api_top(server, prompt))

    # The sample step draws at the slider's temperature with the page's seed: the token
    # /v1/completions draws with the same seed and temperature.
    driver.find_element(*by_id("walk-next")).click()
    wait.until(lambda d: stage_of(d) == "sample")
    assert driver.find_element(*by_id("walk-next")).get_attribute("disabled")
    assert "(T = 1, seed 4)" in current_step(driver).text  # drawn again at the slider's T
    drawn = current_step(driver).find_element(*by_id("walk-drawn"))
    api = httpx.post(f"{server}/v1/completions", timeout=30, json={
        "prompt": prompt, "max_tokens": 1, "temperature": 1, "seed": 4}).json()
    assert drawn.text.replace("·", " ") == api["choices"][0]["text"]

    driver.find_element(*by_id("walk-append")).click()
    wait.until(lambda d: stage_of(d) == "tokens" and current_step(d).find_element(
        By.CLASS_NAME, "walk-tokens").get_attribute("data-count") == str(len(prompt) + 1))
    assert driver.find_element(*by_id("prompt")).get_attribute("value") == (
        prompt + api["choices"][0]["text"])
    save_walk_screenshot(shots, tmp_path / "walk.png")


def save_walk_screenshot(shots: dict[str, bytes], path: Path) -> None:
    """Three steps, one above the other, in one small PNG (SERVE_WALK_SCREENSHOT=path keeps a
    copy: docs/walk.png is made this way)."""
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in shots.values()]
    width = max(i.width for i in images)
    sheet = Image.new("RGB", (width, sum(i.height for i in images) + 8 * len(images)), "#d9e2ec")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height + 8
    sheet.quantize(colors=64).save(path, optimize=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("SERVE_WALK_SCREENSHOT"):
        shutil.copy(path, os.environ["SERVE_WALK_SCREENSHOT"])


@pytest.fixture(scope="module")
def rotary_server():
    """An untrained rotary model with RMSNorm, an untied head and SwiGLU: the walk's other
    branches (the stages do not need a trained model)."""
    import torch

    from model.data.tokenizer import CharTokenizer
    from model.gpt import GPT, GPTConfig
    from model.weights.loading import Pretrained

    chars = " abcdefghijklmnopqrstuvwxyz"
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(chars) + 1, block_size=24, n_layer=3, n_head=2,
                       n_embd=16, pos_emb="rope", norm="rmsnorm", tie_embeddings=False,
                       activation="swiglu")
    pretrained = Pretrained(model=GPT(config).eval(), tokenizer=CharTokenizer(chars),
                            kind="smallgpt", path=Path("rotary"), description="a rotary model")
    with running_server(pretrained, "rotary") as (url, _):
        yield url


def test_walk_a_rotary_model(rotary_server, browser):
    driver = browser
    prompt = "the cat"
    wait = start_walk(driver, rotary_server, prompt, 24)
    assert [s.get_attribute("data-stage") for s in walk_steps(driver)] == expected_stages(3)
    step_forward_to(driver, wait, "position")
    assert "pair 0" in current_step(driver).text and "none: rotary" in current_step(driver).text
    step_forward_to(driver, wait, "softmax")
    assert_same_top(walk_top_at_temperature_1(driver, wait, 0.8), api_top(rotary_server, prompt))
