"""The HTML backtest report: built from a real in-process backtest, checked as text and
in headless Chromium (no errors, no network, markers, metrics, drawdown)."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ktrdr_run.report import MAX_POINTS, MAX_TRADE_ROWS, backtest_report_html, write_backtest_report
from runner import registry
from runner.protocol import OpRecord
from runner.sdk import local_context

PARAMS: dict[str, Any] = {"strategy": "sma_cross", "symbol": "DEMO", "strategy_params": {"fast": 10}}
OP_ID = "bt-<b>&'report"  # markup in the id proves the page escapes it


@dataclass(frozen=True)
class Backtest:
    record: OpRecord
    equity: pd.DataFrame
    trades: pd.DataFrame


@pytest.fixture(scope="module")
def backtest(tmp_path_factory: pytest.TempPathFactory) -> Backtest:
    """sma_cross on the generated DEMO bars, run by the op itself; artifacts read back."""
    op = registry.get("backtest")
    ctx, sink = local_context("backtest", scratch_dir=tmp_path_factory.mktemp("scratch"))
    result = op.fn(ctx, op.parse_params(PARAMS))
    frames = {
        name: pd.read_parquet(io.BytesIO(sink.stored[digest])) for name, digest in result["artifacts"].items()
    }
    record = OpRecord(
        op_id=OP_ID,
        kind="backtest",
        state="completed",
        params=PARAMS,
        result=result,
        artifacts=result["artifacts"],
    )
    return Backtest(record, frames["equity_curve"], frames["trades"])


@pytest.fixture(scope="module")
def report(backtest: Backtest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "nested" / "report.html"
    written = write_backtest_report(path, backtest.record, backtest.equity, backtest.trades)
    assert written == path and path.is_file()
    return path


def _chromium() -> str:
    """The headless shell to drive; skips (fails under CI=true) when it is not there."""
    path = shutil.which("chromium-headless-shell") or "/usr/bin/chromium-headless-shell"
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install playwright)"
    if problem is None and not Path(path).is_file():
        problem = f"chromium-headless-shell is not installed (looked on PATH and at {path})"
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the report browser test needs a headless Chromium in CI: {problem}")
        pytest.skip(problem)
    return path


@dataclass
class Browser:
    page: Any
    errors: list[str]
    requests: list[str]
    url: str


@pytest.fixture(scope="module")
def browser(report: Path) -> Iterator[Browser]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1200, "height": 900})
        seen = Browser(page, [], [], report.as_uri())
        page.on("pageerror", lambda exc: seen.errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: (
                seen.errors.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning")
                else None
            ),
        )
        page.on("request", lambda request: seen.requests.append(request.url))
        page.goto(seen.url, wait_until="load")
        yield seen
        chromium.close()


def _iso(stamps: pd.Series) -> list[str]:
    return [stamp.strftime("%Y-%m-%dT%H:%M:%SZ") for stamp in stamps]


def _floats(text: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", text)]).reshape(-1, 2)


def test_page_loads_without_errors_or_network(browser: Browser) -> None:
    page = browser.page
    box = page.locator("#equity-chart").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.4)
    assert page.locator("#tooltip").is_visible()
    assert "equity" in page.locator("#tooltip").inner_text()
    dd_box = page.locator("#drawdown-chart").bounding_box()
    assert dd_box is not None
    page.mouse.move(dd_box["x"] + 5, dd_box["y"] + 5)
    page.mouse.move(5, 5)
    assert not page.locator("#tooltip").is_visible()
    assert browser.errors == []
    assert browser.requests == [browser.url]


def test_one_marker_per_entry_and_exit(browser: Browser, backtest: Backtest) -> None:
    page, trades = browser.page, backtest.trades
    closed = trades[~trades["is_open"]]
    assert len(trades) > 20 and trades["is_open"].sum() == 1 and set(trades["side"]) == {"long", "short"}
    assert page.locator(".trade-marker.entry").count() == len(trades)
    assert page.locator(".trade-marker.exit").count() == len(closed)
    for side in ("long", "short"):
        assert page.locator(f".trade-marker.entry.{side}").count() == (trades["side"] == side).sum()
    entries = page.locator(".trade-marker.entry")
    times = [entries.nth(i).get_attribute("data-time") for i in range(entries.count())]
    assert times == _iso(trades["entry_time"])
    exits = page.locator(".trade-marker.exit")
    assert [exits.nth(i).get_attribute("data-time") for i in range(exits.count())] == _iso(
        closed["exit_time"]
    )
    assert "long entry" in entries.first.locator("title").text_content()


def test_metrics_and_params_tables(browser: Browser, backtest: Backtest) -> None:
    page = browser.page
    metrics = backtest.record.result["metrics"]  # type: ignore[index]
    sharpe = page.locator('table.metrics tr[data-metric="sharpe_ratio"] td').inner_text()
    assert sharpe == f"{metrics['sharpe_ratio']:,.4f}"
    max_dd = page.locator('table.metrics tr[data-metric="max_drawdown_pct"] td').inner_text()
    assert max_dd == f"{metrics['max_drawdown_pct'] * 100:,.2f} %"
    assert page.locator("table.metrics tr").count() == len(metrics)
    assert page.locator('tr[data-param="strategy_params.fast"] td').inner_text() == "10"
    assert page.locator('tr[data-param="strategy_params.slow"] td').inner_text() == "30 (default)"
    assert page.locator("table.trades tbody tr").count() == min(len(backtest.trades), MAX_TRADE_ROWS)
    title = page.title()
    assert OP_ID in title and "sma_cross(fast=10, slow=30)" in title and "DEMO 1d" in title


def test_drawdown_lowest_point_is_the_max_drawdown(browser: Browser, backtest: Backtest) -> None:
    page = browser.page
    svg = page.locator("#drawdown-chart")
    x0, x1 = float(svg.get_attribute("data-x0") or "nan"), float(svg.get_attribute("data-x1") or "nan")
    bottom = float(svg.get_attribute("data-y-bottom") or "nan")
    points = _floats(page.locator("#drawdown-path").get_attribute("d") or "")
    lowest = points[np.argmax(points[:, 1])]

    eq = backtest.equity["equity"].to_numpy()
    peak = np.maximum.accumulate(eq)
    drawdown = (peak - eq) / peak
    deepest = int(np.argmax(drawdown))
    metrics = backtest.record.result["metrics"]  # type: ignore[index]
    assert drawdown.max() == pytest.approx(metrics["max_drawdown_pct"])
    assert lowest[1] == pytest.approx(bottom, abs=0.01)
    assert lowest[0] == pytest.approx(x0 + deepest / (len(eq) - 1) * (x1 - x0), abs=0.01)
    assert f"{drawdown.max() * 100:,.2f} %" in page.locator("#max-drawdown").inner_text()
    # The browser agrees: nothing of the path lies below the plot.
    bbox = page.evaluate(
        "() => { const b = document.getElementById('drawdown-path').getBBox(); return b.y + b.height; }"
    )
    assert bbox == pytest.approx(bottom, abs=0.01)


def test_screenshot(browser: Browser, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    browser.page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_html_is_self_contained_and_escaped(backtest: Backtest) -> None:
    text = backtest_report_html(backtest.record, backtest.equity, backtest.trades)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert not re.search(r"\b(src|href)=", text) and "fetch(" not in text and "@import" not in text
    assert OP_ID not in text and html_escaped(OP_ID) in text
    # The polyline is downsampled but keeps the extremes.
    points = re.search(r'<polyline id="equity-line" class="equity-line" points="([^"]+)"', text)
    assert points is not None
    xy = _floats(points.group(1))
    assert len(backtest.equity) > MAX_POINTS >= len(xy)
    svg = re.search(r'<svg[^>]*id="equity-chart"[^>]*>', text)
    assert svg is not None
    attrs = dict(re.findall(r'data-([a-z0-9-]+)="([^"]*)"', svg.group(0)))
    top, bottom = float(attrs["y-top"]), float(attrs["y-bottom"])
    vmin, vmax = float(attrs["vmin"]), float(attrs["vmax"])

    def y(value: float) -> float:
        return top + (vmax - value) / (vmax - vmin) * (bottom - top)

    eq = backtest.equity["equity"]
    assert xy[:, 1].min() == pytest.approx(y(eq.max()), abs=0.01)
    assert xy[:, 1].max() == pytest.approx(y(eq.min()), abs=0.01)


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")


def test_open_trade_without_exit_time_and_no_trades(backtest: Backtest) -> None:
    trades = backtest.trades.drop(columns=["is_open"]).copy()
    trades.loc[trades.index[-1], "exit_time"] = pd.NaT
    text = backtest_report_html(backtest.record, backtest.equity, trades)
    assert text.count('class="trade-marker entry') == len(trades)
    assert text.count('class="trade-marker exit') == len(trades) - 1
    assert "still open" in text
    empty = backtest_report_html(backtest.record, backtest.equity, trades.iloc[:0])
    assert 'class="trade-marker' not in empty and "No trades." in empty


def test_one_bar_and_many_trades(backtest: Backtest) -> None:
    one = backtest_report_html(backtest.record, backtest.equity.iloc[:1], backtest.trades.iloc[:0])
    assert 'id="drawdown-path"' in one and not re.search(r"\bnan\b|\binf\b", one, re.IGNORECASE)
    many = pd.concat([backtest.trades] * 5, ignore_index=True)
    text = backtest_report_html(backtest.record, backtest.equity, many)
    assert text.count('<tr class="trade ') == MAX_TRADE_ROWS
    assert f"The first {MAX_TRADE_ROWS} of {len(many):,} trades" in text
