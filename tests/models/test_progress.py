"""The progress line's ETA: measured from the first report, so start-up does not inflate it."""

from __future__ import annotations

import io

import pytest

from models.commands.progress import Eta, ProgressLine, bar, eta_text


def test_the_eta_leaves_out_the_time_before_the_first_item() -> None:
    eta = Eta()
    # 1 of 100 done after 10 s of start-up (process pool, data loaders), then 1 s per item.
    assert eta(elapsed_s=10.0, done=1, total=100) is None
    assert eta(elapsed_s=15.0, done=6, total=100) == pytest.approx(94.0)  # not 15 / 6 * 94 = 235
    assert eta(elapsed_s=60.0, done=51, total=100) == pytest.approx(49.0)
    assert eta(elapsed_s=109.0, done=100, total=100) == 0.0


def test_a_resumed_run_measures_from_its_own_first_report() -> None:
    eta = Eta()
    assert eta(elapsed_s=3.0, done=40, total=100) is None  # 40 steps were done before the resume
    assert eta(elapsed_s=5.0, done=42, total=100) == pytest.approx(58.0)


def test_eta_text_and_bar() -> None:
    assert eta_text(None) == "ETA --" and eta_text(41.6) == "ETA 42s"
    assert bar(0.5, width=4) == "[##--]  50%"


def test_plain_streams_get_throttled_whole_lines() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream, plain_every_s=3600)
    line.update("first")
    line.update("dropped")
    line.update("forced", force=True)
    line.done("end")
    assert stream.getvalue() == "first\nforced\nend\n"
