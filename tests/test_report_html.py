"""report.html is one self-contained page (plots embedded, nothing fetched) that a real browser renders; the
plots' statistics (mean and band over seeds, the Pareto front) are checked on known inputs."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import tunelab
from tunelab.report.figures import front_score, mean_and_band, pareto_front

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_bert, toy_data):
    out = tmp_path_factory.mktemp("html")
    overrides = [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
                 f"data.validation_file={toy_data['validation']}", f"data.test_file={toy_data['test']}",
                 "data.max_length=32", "train.batch_size=8", "methods=full,lora", "lora.r=4", "lora.lr=1e-2"]
    tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False, seeds=2)
    return out


def test_the_page_embeds_every_plot_and_references_nothing_outside(experiment):
    page = (experiment / "report.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    plots = sorted(p.name for p in (experiment / "plots").glob("*.png"))
    assert len(sources) == len(plots) >= 3  # validation curves, train loss, trade-offs
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(?!data:)', page) and "http" not in page.replace("http-equiv", "")
    assert "<table>" in page and "Ranking" in page


def test_validation_curves_have_about_ten_evaluations_by_default(experiment):
    import json

    records = json.loads((experiment / "results.json").read_text())["methods"]
    assert all(len(r["history"]) >= 10 for r in records)  # 20 steps, no eval_every_steps given


@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS),
                    reason="no headless browser (chromium) installed: the HTML report was not rendered")
def test_a_headless_browser_renders_the_page_with_every_image_decoded(experiment, tmp_path):
    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    page = (experiment / "report.html").read_text()
    probe = ("<script>window.onload = () => { const imgs = [...document.images]; document.title = "
             "'decoded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' + imgs.length; };"
             "</script></body>")
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    count = len(list((experiment / "plots").glob("*.png")))
    assert f"<title>decoded {count} of {count}</title>" in dom


def test_mean_and_band_use_the_steps_every_seed_reached():
    steps, mean, low, high = mean_and_band([{1: 0.5, 2: 0.7, 3: 0.8}, {1: 0.3, 2: 0.9}])
    assert steps.tolist() == [1, 2]
    np.testing.assert_allclose(mean, [0.4, 0.8])
    np.testing.assert_allclose(low, [0.3, 0.7])
    np.testing.assert_allclose(high, [0.5, 0.9])


def test_pareto_front_keeps_only_undominated_methods():
    # (cost, score): cheap and decent, dear and best, dear and worse than the cheap one, a tie on cost
    points = [(1.0, 0.70), (10.0, 0.80), (10.0, 0.65), (1.0, 0.60)]
    assert pareto_front(points, higher=True) == {0, 1}
    assert pareto_front([(1.0, 2.0), (2.0, 1.0), (3.0, 1.5)], higher=False) == {0, 1}


def test_a_method_tied_with_the_best_stands_on_the_front_with_the_best_score():
    def entry(mean, result):
        return {"metrics": {"accuracy": {"mean": mean}}, "verdict": {"result": result}}

    # full is best, lora a tie at a hundredth of the cost, prompt tuning worse and cheapest, ia3 tied but dearer
    entries = {"full": entry(0.82, "best"), "lora": entry(0.80, "tie"), "prompt": entry(0.70, "worse"),
               "ia3": entry(0.79, "tie")}
    costs = {"full": 100.0, "lora": 1.0, "prompt": 0.1, "ia3": 2.0}
    names = list(entries)
    scores = [front_score(entries[m], "accuracy", 0.82) for m in names]
    assert scores == [0.82, 0.82, 0.70, 0.82]
    front = {names[i] for i in pareto_front([(costs[m], s) for m, s in zip(names, scores)], higher=True)}
    assert front == {"lora", "prompt"}  # on point estimates full and lora both stood on it
    assert {names[i] for i in pareto_front([(costs[m], entries[m]["metrics"]["accuracy"]["mean"]) for m in names],
                                           higher=True)} == {"full", "lora", "prompt"}
