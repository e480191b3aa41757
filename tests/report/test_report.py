"""``keepbest report``: what the page shows of a run, how it stays small for long runs, and the command."""

from __future__ import annotations

import json
import random
import re
import time

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepBest, KeepLast, Monitor
from keepbest.errors import PublishError, StorageError
from keepbest.publishing import Publisher, PublishQueue
from keepbest.report import ReportData, Save, SeriesReport, gather, render, thin, write_report
from keepbest.report._svg import TOOLTIPS
from tests.cli.test_cli import keepbest


def _run(folder, publishers=()) -> CheckpointManager:
    mgr = CheckpointManager(folder, monitor=Monitor("val_loss", "min"), keep=[KeepLast(2), KeepBest(1)],
                            publishers=publishers)
    for epoch, loss in enumerate([3.0, 1.0, 2.0, 4.0, 5.0], start=1):
        mgr.save(epoch * 10, {"w": np.full(4, epoch, np.float32)}, metrics={"loss": loss + 1, "val_loss": loss},
                 epoch=epoch)
    return mgr


def _synthetic(n: int, kept_every: int = 10) -> ReportData:
    rng = random.Random(0)
    saves = [Save(name=f"ckpt-{i}", version=i, created=float(i), step=i * 10, epoch=i + 1,
                  value=1 / (i + 1) + rng.random() * 0.1, state="kept" if i % kept_every == 0 else "deleted",
                  reason=None if i % kept_every == 0 else "retention: keep_last=3", best=i == n // 2,
                  aliases=("production",) if i == n // 3 else (), metrics={"loss": rng.random()},
                  evaluations={"eval": {"loss": rng.random()}} if i % 50 == 0 else {}, size=1 << 20,
                  reused=(1 << 19) * (i % 2), stall=rng.random() / 100, persist=rng.random(), integrity="ok")
             for i in range(n)]
    return ReportData("runs/long", [SeriesReport("ckpt", saves, "val_loss", "min", {"production": n // 3})], 1.0)


def _dots(html: str, path_id: str) -> int:
    return len(re.search(rf'id="{path_id}"[^>]* d="([^"]*)"', html).group(1).split("M")) - 1


def test_thin_keeps_every_point_under_the_budget():
    assert thin([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], budget=10) == [0, 1, 2]


def test_thin_keeps_at_most_the_budget_with_the_first_last_and_extremes():
    ys = [float(np.sin(i / 50)) for i in range(10_000)]
    ys[1234], ys[8765] = 50.0, -50.0
    keep = thin(list(map(float, range(10_000))), ys, budget=200)
    assert len(keep) <= 202 and {0, 9999, 1234, 8765} <= set(keep)


def test_markers_of_kept_best_and_aliased_saves_are_never_thinned():
    data = _synthetic(10_000, kept_every=3)
    html = render(data)
    kept = sum(s.state == "kept" for s in data.series[0].saves)
    assert kept > TOOLTIPS and _dots(html, "kept-markers") == kept
    assert html.count('id="best-marker"') == 1 and f'id="alias-v{10_000 // 3}"' in html


def test_every_deleted_save_is_drawn_and_some_have_a_tooltip_of_their_own():
    data = _synthetic(2_000)
    html = render(data)
    deleted = sum(s.state == "deleted" for s in data.series[0].saves)
    assert _dots(html, "deleted-markers") == deleted
    assert html.count('class="deleted-marker"') == TOOLTIPS


def test_ten_thousand_saves_render_under_one_megabyte_within_two_seconds():
    data = _synthetic(10_000)
    began = time.perf_counter()
    html = render(data)
    seconds = time.perf_counter() - began
    assert len(html.encode("utf-8")) < 1_000_000 and seconds < 2.0, (len(html), seconds)


def test_deleted_checkpoints_are_shown_with_the_rule_that_deleted_them(tmp_path):
    _run(tmp_path)
    saves = gather(tmp_path).series[0].saves
    assert [(s.epoch, s.state) for s in saves] == [(1, "deleted"), (2, "kept"), (3, "deleted"), (4, "kept"),
                                                   (5, "kept")]
    assert saves[0].reason == "retention: keep_last=2, keep_best=1" and saves[0].value == 3.0


def test_the_best_and_the_aliases_are_shown(tmp_path):
    _run(tmp_path).promote(3, "production")
    series = gather(tmp_path).series[0]
    assert [s.epoch for s in series.saves if s.best] == [2]
    assert series.aliases["production"] == 3 and series.saves[3].user_aliases == ("production",)


def test_a_run_saved_before_stall_and_persist_were_recorded_renders_without_them(tmp_path):
    data = _synthetic(3)
    for s in data.series[0].saves:
        s.stall = s.persist = s.reused = None
    html = render(data)
    assert "No save recorded its timing." in html and 'id="metric-curve"' in html


class _Recorder(Publisher):
    def committed(self, version):
        pass


class _Broken(Publisher):
    def committed(self, version):
        raise ConnectionError("tracker unreachable")


def test_what_each_publisher_uploaded_is_shown(tmp_path):
    queue = PublishQueue([_Recorder(), _Broken()], attempts=1, backoff=0.0)
    mgr = _run(tmp_path, publishers=queue)
    with pytest.raises(PublishError, match="tracker unreachable"):
        mgr.close()
    newest = gather(tmp_path).series[0].saves[-1]
    assert newest.published == {"_Recorder": True, "_Broken": False}
    assert "_Broken: FAILED" in render(gather(tmp_path))


def test_an_unknown_series_is_refused_naming_the_ones_there(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match=r"has no such series.*Available: ckpt"):
        gather(tmp_path, series="other")


def test_a_report_cannot_be_written_to_a_url(tmp_path):
    _run(tmp_path)
    with pytest.raises(StorageError, match="only a local file path"):
        write_report(tmp_path, "s3://bucket/report.html")


def test_the_command_writes_the_page_and_says_where(tmp_path):
    _run(tmp_path / "run")
    done = keepbest("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    assert f"Wrote {tmp_path / 'r.html'}" in done.stdout and 'id="metric-curve"' in (tmp_path / "r.html").read_text()


def test_the_command_prints_what_the_page_shows_as_json(tmp_path):
    _run(tmp_path / "run")
    done = keepbest("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), "--json")
    doc = json.loads(done.stdout)
    assert [s["state"] for s in doc["series"][0]["saves"]].count("deleted") == 2


def test_the_command_exits_2_for_an_unknown_series(tmp_path):
    _run(tmp_path / "run")
    done = keepbest("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), "--series", "nope")
    assert done.returncode == 2 and "Available: ckpt" in done.stderr


def test_the_command_reports_a_run_in_a_bucket(s3, tmp_path):
    pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")
    url = s3.url("report")
    _run(url)
    done = keepbest("report", url, "-o", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    assert re.search(r'id="deleted-v0"[^>]*><title>[^<]*retention: keep_last=2', (tmp_path / "r.html").read_text())


def test_deleted_saves_keep_the_training_metrics_they_were_saved_with(tmp_path):
    _run(tmp_path)
    first = gather(tmp_path).series[0].saves[0]
    assert first.state == "deleted" and first.metrics == {"loss": 4.0, "val_loss": 3.0}


def test_a_damaged_checkpoint_is_marked_and_the_command_exits_1(tmp_path):
    _run(tmp_path / "run")
    (tmp_path / "run" / "ckpt-000000040" / "state.safetensors").unlink()  # v3: its data is gone
    done = keepbest("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"))
    assert done.returncode == 1, done.stderr
    assert 'id="damaged-v3"' in (tmp_path / "r.html").read_text()


def test_verify_rehashes_each_kept_checkpoint_and_names_a_corrupt_one(tmp_path):
    from tests.helpers import flip_byte

    _run(tmp_path)
    flip_byte(tmp_path / "ckpt-000000050" / "state.safetensors", -1)
    kept = [s for s in gather(tmp_path, verify=True).series[0].saves if s.state == "kept"]
    assert [s.integrity.split(":")[0] for s in kept] == ["verified", "verified", "corrupt"]


def test_the_command_json_has_no_bare_nan(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", monitor=Monitor("loss", "min"))
    mgr.save(1, {"w": np.zeros(2)}, metrics={"loss": float("nan")}, epoch=1)
    done = keepbest("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), "--json")
    doc = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert doc["series"][0]["saves"][0]["value"] == "nan"


def test_a_metric_name_holding_markup_never_reaches_the_page_as_markup(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"))
    hostile = 'a"><script>alert(1)</script>'
    for epoch in (1, 2):
        mgr.save(epoch, {"w": np.zeros(2)}, metrics={"val_loss": 1.0 / epoch, hostile: 0.5}, epoch=epoch)
    page = render(gather(tmp_path))
    assert "<script" not in page and 'id="metric-a___script_alert_1___script_"' in page
