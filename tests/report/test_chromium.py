"""The report of a real run (Keras on its backend, retention deleting, a sidecar evaluation) in headless
Chromium, offline: it loads without a console message or a network request and shows its key elements."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.report.chromium import load, need_chromium, screenshot

EPOCHS = 6


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    import keras

    import keepbest.keras
    from keepbest.report import write_report
    from tests.keras.sidecar_procs import eval_data, make_model, train_data

    work = tmp_path_factory.mktemp("report")
    model = make_model()
    x, y = train_data()
    model.fit(x, y, validation_split=0.2, epochs=EPOCHS, batch_size=128, verbose=0, callbacks=[
        keepbest.keras.ModelCheckpoint(str(work / "run" / "ckpt-{epoch:02d}"), keep_last=2, keep_best=1,
                                       async_save=True)])
    evaluator = keepbest.keras.SidecarEvaluator(make_model(), eval_data(), work / "run", max_evaluations=2, verbose=0)
    evaluator.start()
    assert evaluator.evaluated, "the sidecar evaluated nothing"
    keras.backend.clear_session()
    where, _data = write_report(work / "run", work / "report.html")
    return Path(where)


@pytest.fixture(scope="module")
def loaded(report):
    need_chromium()
    return load(report, report.parent)


def test_the_report_loads_offline_without_a_network_request(loaded):
    assert loaded.requests == []


def test_the_report_loads_without_console_messages(loaded):
    assert loaded.console == []


def test_the_loaded_report_shows_the_curve_the_best_marker_and_the_deleted_markers(loaded):
    ids = set(re.findall(r'\bid="([^"]+)"', loaded.dom))
    assert {"metric-curve", "best-marker", "deleted-markers"} <= ids
    deleted = sorted(i for i in ids if i.startswith("deleted-v"))
    assert len(deleted) >= EPOCHS - 3  # keep_last=2 and keep_best=1 of 6 saves
    assert re.search(r'class="deleted-marker"[^>]*><title>[^<]*retention: keep_last=2', loaded.dom)


def test_the_loaded_report_shows_the_sidecar_evaluation_beside_training(loaded):
    assert 'class="eval' in loaded.dom and 'id="metric-loss"' in loaded.dom


def test_the_report_references_nothing_over_http(report):
    html = report.read_text()
    assert re.findall(r'(?:src|href)\s*=\s*["\']?\s*https?://', html, re.I) == []
    assert "http://" not in html and "https://" not in html


def test_a_screenshot_of_the_report_is_kept_as_an_artifact(report):
    shot = screenshot(report, report.parent, report.parent / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = os.environ.get("KEEPBEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report.png")


def test_the_offline_check_sees_a_page_that_fetches_or_logs(tmp_path):
    need_chromium()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><img src="https://example.com/a.png"><script>console.error("boom")</script>')
    seen = load(page, tmp_path)
    assert seen.requests == ["https://example.com/a.png"]
    assert any('"boom"' in line for line in seen.console)
