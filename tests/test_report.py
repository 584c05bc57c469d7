"""llmft report: the run's page after training and after llmft eval, several runs side by side, checked in a real
headless browser (Chromium driven by Playwright) where one is installed."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmft.cli import run as llmft
from llmft.config import load_recipe
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import assert_report, chat_rows, write_jsonl, write_recipe

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
         "lima", "mike", "november", "oscar", "papa")
MARKUP = "</td><script>window.injected = 1</script> & <b>bold</b>"
# Screenshots of the pages the browser test loaded, kept for people to look at.
SCREENSHOTS = Path(os.environ.get("LLMFT_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two tiny LoRA runs on a built dataset (with its manifest), differing in learning rate; the first saves
    checkpoints and evaluates during training."""
    tmp = tmp_path_factory.mktemp("report")
    source = write_jsonl(tmp / "chats.jsonl", [  # prompts that share no word, and markup that must stay text
        {"messages": [{"role": "user", "content": f"Repeat {word} {MARKUP}"}, {"role": "assistant", "content": word}]}
        for word in WORDS])
    assert llmft(["data", "convert", str(source), "--out", str(tmp / "built"), "--near-dedupe", "off",
                  "--test-fraction", "0.25"]) == 0
    made = []
    for name, lr, extra in (("lr-1e-2", 1e-2, {"save_strategy": "steps", "save_steps": 2, "eval_strategy": "steps",
                                               "eval_steps": 2}), ("lr-3e-2", 3e-2, {})):
        out = tmp / "runs" / name
        train(load_recipe(write_recipe(tmp / f"{name}.yaml", tiny_model_dir, tmp / "built", out,
                                       training={"max_steps": 4, "learning_rate": lr, "save_total_limit": 2, **extra},
                                       eval={"num_generate": 3, "max_new_tokens": 4})))
        made.append(out)
    return made


def test_every_run_gets_a_self_contained_page(runs):
    page = (runs[0] / "report.html").read_text()
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # the browser test watches what scripts fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", markup), "the page must load nothing from the web"
    for section in ("Before and after training", "Training curves", "Samples (3 held-out prompts)", "Data",
                    "Speed and cost", "Recipe"):
        assert section in page
    assert "checkpoint at step 2" in page and "checkpoint at step 4" in page
    assert "<script>window.injected" not in page and "&lt;script&gt;window.injected" in page  # samples are text
    assert "chats" in page and "Sources (data build manifest)" in page  # the build manifest travelled with the run
    assert (runs[0] / "data" / "manifest.json").exists()
    info = json.loads((runs[0] / "run.json").read_text())["data"]["train"]["tokenized"]
    assert info["length"]["max"] >= info["length"]["p50"] > 0 and sum(info["length_histogram"]["counts"]) == \
        info["examples"]


def test_a_run_without_held_out_data_gets_a_page_without_those_sections(tmp_path, tiny_model_dir):
    out = train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir,
                                         write_jsonl(tmp_path / "t.jsonl", chat_rows(6)), tmp_path / "run",
                                         data={"eval_fraction": 0.0})))
    page = assert_report(out, "Training curves", "Data", "Speed and cost", "Recipe")
    assert "Before and after training" not in page and "Samples (" not in page


def test_several_runs_side_by_side_with_their_recipe_differences(runs, tmp_path):
    out = tmp_path / "both.html"
    result = subprocess.run([LLMFT, "report", *map(str, runs), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert "Side by side" in page and "Recipe differences" in page
    differences = page.split("Recipe differences")[1].split("</table>")[0]
    assert "training.learning_rate" in differences and "0.03" in differences
    assert "model.name_or_path" not in differences  # the same in both


def test_out_as_a_folder_gets_the_page_in_it(runs, tmp_path):
    assert llmft(["report", str(runs[0]), "--out", str(tmp_path)]) == 0
    assert "Training curves" in (tmp_path / "report.html").read_text()


def test_a_missing_run_is_a_clear_error(tmp_path):
    result = subprocess.run([LLMFT, "report", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a complete run directory" in result.stderr


def test_llmft_eval_refreshes_the_page(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = (run / "report.html").read_text()
    assert "llmft eval (" not in before
    assert llmft(["eval", str(run), "--num_generate", "2", "--max_new_tokens", "3"]) == 0
    assert "llmft eval (" in (run / "report.html").read_text()


def _browser() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def test_the_page_works_in_a_real_browser(runs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    browser_path = _browser()
    if browser_path is None:
        assert not os.environ.get("LLMFT_REQUIRE_BROWSER"), "LLMFT_REQUIRE_BROWSER is set but no Chromium is found"
        pytest.skip("no Chromium installed (.ci/run installs Debian's chromium package)")
    both = tmp_path / "both.html"
    assert llmft(["report", *map(str, runs), "--out", str(both)]) == 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # Flags: no sandbox (CI runs as root), and no background connections to Google's services.
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        for page_file, shot in ((runs[0] / "report.html", "report_one_run.png"), (both, "report_two_runs.png")):
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: errors.append(f"request {r.url}") if not r.url.startswith(
                ("file:", "data:", "blob:")) else None)
            page.goto(page_file.as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length === "
                                   "document.querySelectorAll('.chart').length")
            assert errors == []
            assert page.evaluate("window.injected") is None  # the samples' markup stayed text
            drawn = page.evaluate("""Array.from(document.querySelectorAll('.js-plotly-plot')).map(el =>
                [el.layout.title.text, el.querySelectorAll('.scatterlayer .trace path.js-line, .scatterlayer '
                 + '.point, .barlayer .point').length, el.data.reduce((n, t) => n + (t.y ? t.y.length : 0), 0)])""")
            assert drawn and all(marks > 0 and points > 0 for _, marks, points in drawn), drawn
            if page_file == both:
                assert any(title == "loss (all runs)" for title, _, _ in drawn)
            page.screenshot(path=str(SCREENSHOTS / shot), full_page=True)
            assert (SCREENSHOTS / shot).stat().st_size > 10_000
            if page_file != both:
                _check_filter(page)
                _check_token_axis(page)
            page.close()
        browser.close()


def _check_filter(page):
    samples = [json.loads(line) for line in (Path(page.url[len("file://"):]).parent / "eval_samples.jsonl")
               .read_text().splitlines()]
    rows = page.locator("table.samples tbody tr")
    assert rows.count() == len(samples) == 3
    prompts = [s["prompt"] for s in samples]
    unique = next(i for i, prompt in enumerate(prompts) if prompts.count(prompt) == 1)
    box = page.locator(".sample-filter").first
    box.fill(prompts[unique])
    visible = [row for row in range(rows.count()) if rows.nth(row).is_visible()]
    assert visible == [unique] and page.locator(".shown").first.inner_text() == "1 shown"
    box.fill("no row holds this text")
    assert page.locator(".shown").first.inner_text() == "0 shown"
    box.fill("")
    assert page.locator(".shown").first.inner_text() == "3 shown"
    menu = page.locator(".sample-status").first
    statuses = [v for v in menu.locator("option").evaluate_all("os => os.map(o => o.value)") if v]
    assert statuses  # every row has one of fixed, broken, right, wrong
    for status in statuses:
        menu.select_option(status)
        expected = sum(rows.nth(i).get_attribute("data-status") == status for i in range(rows.count()))
        assert page.locator(".shown").first.inner_text() == f"{expected} shown" and expected > 0
    menu.select_option("")


def _check_token_axis(page):
    """The loss chart switches its x axis from steps to tokens seen."""
    chart = page.locator(".js-plotly-plot").first
    chart.get_by_text("tokens seen").click()
    page.wait_for_timeout(300)
    axis = page.evaluate("document.querySelector('.js-plotly-plot').layout.xaxis.title.text")
    assert axis == "tokens seen"
    xs = page.evaluate("document.querySelector('.js-plotly-plot').data[0].x")
    assert xs == sorted(xs) and xs[-1] > 4  # tokens, not the step numbers 1..4
