"""The playground in a real browser: headless Chromium drives every page against tiny real models and a real run.

Skipped only where Chromium is not installed (`.ci/run` installs Debian's `chromium`). Screenshots of each page
are saved under the test's tmp folder.
"""

from __future__ import annotations

import threading

import pytest
import torch

from bertforge.monitor import read_metrics
from bertforge.serve import load_table, make_server
from browser import CHROMIUM, Chromium
from serve_data import make_classifier, make_run, make_tagger, ok, write_vocab
from training_data import make_pretrained

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                                          "the browser test needs it")


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    tiny = make_pretrained(root / "tiny", write_vocab(root / "vocab"))
    run = make_run(root)
    table = load_table([str(tiny), str(make_classifier(root, tiny)), str(make_tagger(root, tiny))], [str(run)],
                       torch.device("cpu"))
    httpd = make_server(table, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.url.rstrip("/"), run
    httpd.shutdown()
    httpd.server_close()


def open_page(browser: Chromium, page: str) -> None:
    """Switch pages with a click on the tab, as a user does."""
    browser.click(f'#tabs a[data-page="{page}"]')
    browser.wait_for(f'document.getElementById("page-{page}").classList.contains("active")')


def test_every_page_works_in_chromium(playground, tmp_path):
    base, run = playground
    with Chromium(tmp_path / "profile") as browser:
        browser.goto(base + "/")
        browser.wait_for('document.body.dataset.ready === "true"')

        # fill-mask: typing predicts (debounced), clicking a word masks it
        text = "a man bought a gallon of [MASK] ."
        browser.type_into("#fm-text", text)
        browser.wait_for('document.querySelectorAll("#fm-results .mask-block").length === 1 && '
                         'document.querySelector("#fm-results .tokens").textContent.includes("gallon")')
        shown = browser.evaluate('[...document.querySelectorAll("#fm-results .candidate .name")].map(n => n.textContent)')
        expected = ok(base, "/api/fill-mask", {"model": "tiny", "text": text, "top_k": 5})
        assert shown == [c["token"] for c in expected["masks"][0]["candidates"]]
        browser.click("#fm-words span")  # the first word, "a"
        browser.wait_for('document.querySelectorAll("#fm-results .mask-block").length === 2')
        assert browser.evaluate('document.getElementById("fm-text").value') == "[MASK] man bought a gallon of [MASK] ."
        browser.screenshot(tmp_path / "fill-mask.png")
        browser.type_into("#fm-text", "北京是中国的[MASK]都")  # one chip and one token per character
        browser.wait_for('document.querySelector("#fm-results .tokens")?.textContent.includes("北")')
        assert browser.evaluate('[...document.querySelectorAll("#fm-words span")].map(s => s.textContent)') == \
            list("北京是中国的都")
        browser.type_into("#fm-text", "no mask here")
        browser.click("#fm-run")  # the server's one-line refusal is shown
        assert "has no [MASK]" in browser.wait_for('document.getElementById("fm-error").textContent')

        # NSP: the NotNext preset
        open_page(browser, "nsp")
        browser.click("#nsp-preset-notnext")
        shown = browser.wait_for('document.getElementById("nsp-probability")?.textContent')
        expected = ok(base, "/api/nsp", {"model": "tiny", "a": "the man went to the store .",
                                         "b": "penguins are flightless birds ."})
        assert shown == f"{100 * expected['is_next']:.1f}%"
        browser.screenshot(tmp_path / "nsp.png")

        # attention: 2 layers x 2 heads of thumbnails; a click opens one head; [CLS]/[SEP] can be hidden
        open_page(browser, "attention")
        browser.click("#att-run")
        browser.wait_for('document.querySelectorAll("#att-grid canvas").length === 4')
        browser.click('#att-grid canvas[data-layer="1"][data-head="1"]')
        browser.wait_for('document.querySelector("#att-detail h3")?.textContent === "Layer 1, head 1"')
        full = browser.evaluate('document.getElementById("att-detail-canvas").width')
        painted = browser.evaluate("""(() => { const c = document.getElementById("att-detail-canvas");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] < 200 && d[i + 2] > 150) n++; return n; })()""")
        assert painted > 100  # blue heatmap cells were drawn
        browser.hover("#att-detail-canvas", 0.995, 0.995)  # the last query's weight on the last key, as a tooltip
        weights = ok(base, "/api/attention", {"model": "tiny", "text": "the man went to the store .",
                                              "text_b": "he bought a gallon of milk ."})["weights"]
        tooltip = browser.wait_for('document.getElementById("att-detail-canvas").title')
        assert tooltip == f"[SEP] → [SEP]: {weights[1][1][-1][-1]:.4f}"
        browser.click("#att-hide")
        browser.wait_for(f'document.getElementById("att-detail-canvas").width < {full}')
        assert browser.evaluate('document.querySelectorAll("#att-grid canvas")[0].width') == 14  # 17 tokens - 3
        browser.screenshot(tmp_path / "attention.png")

        # fine-tuned: the classifier's label and bars, then the tagger's entities highlighted
        open_page(browser, "finetuned")
        browser.evaluate('(() => { const s = document.getElementById("ft-model"); s.value = "classifier"; '
                         's.dispatchEvent(new Event("change")); })()')
        browser.type_into("#ft-text", "an awful film")
        browser.click("#ft-run")
        label = browser.wait_for('document.getElementById("ft-label")?.textContent')
        assert label == ok(base, "/api/predict", {"model": "classifier", "text": "an awful film"})["label"]
        assert browser.evaluate('document.querySelectorAll("#ft-result .candidate").length') == 2
        browser.screenshot(tmp_path / "classify.png")
        browser.evaluate('(() => { const s = document.getElementById("ft-model"); s.value = "tagger"; '
                         's.dispatchEvent(new Event("change")); })()')
        browser.click("#ft-run")
        marks = browser.wait_for('[...document.querySelectorAll("#ft-result mark")].map(m => m.textContent)')
        assert marks == ["JohnPER", "ParisLOC"]
        browser.screenshot(tmp_path / "ner.png")

        # runs: the curves come from metrics.jsonl (one point per logged training step)
        open_page(browser, "runs")
        browser.wait_for('document.querySelectorAll("#run-loss polyline.series").length > 0')
        lines = browser.evaluate('Object.fromEntries([...document.querySelectorAll("#run-loss polyline.series")]'
                                 '.map(p => [p.dataset.name, p.getAttribute("points").split(" ").length]))')
        train_steps = [r for r in read_metrics(run / "metrics.jsonl") if "split" not in r and "event" not in r]
        assert lines["train loss"] == len(train_steps) == 6 and lines["validation mlm_loss"] == 2
        assert browser.evaluate('document.querySelectorAll("#run-accuracy polyline.series").length') >= 2
        assert "step_0000006" in browser.evaluate('document.getElementById("run-checkpoints").textContent')
        browser.screenshot(tmp_path / "runs.png")

        # a narrow laptop window: nothing overflows sideways
        browser.resize(800, 700)
        open_page(browser, "fill-mask")
        assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # no script error; the only failed request is the refused text without [MASK]
        assert browser.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    assert all((tmp_path / f"{name}.png").stat().st_size > 5000
               for name in ("fill-mask", "nsp", "attention", "classify", "ner", "runs"))
