"""Does the TUI keep up with a busy lab? Events at a steady rate through the view model and the
app (headless, with Textual's Pilot), with the app's own 10 Hz tick doing the work.

Two measures:

  model only   how many events a second `LabModel` folds, with nothing drawn (its ceiling)
  app          the recorded event stream replayed at --rate events/s for --seconds, in a loop,
               each pass with fresh flow ids (new connections), while the app shows one view;
               per view: events folded, ticks, time per tick, the lag from "posted by the
               backend's thread" to "folded and drawn", the backlog, and the model's sizes
               (which must stay under its bounds however long it runs)

Usage (no root needed; the stream is tests/tui/fixtures/bookinfo, recorded from a real lab):

    .venv/bin/python bench/bench_tui.py [--rate 500] [--seconds 10] [--views flows,events,cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")

from lab.tui.app import LabApp  # noqa: E402
from lab.tui.backend import RecordedBackend  # noqa: E402
from lab.tui.model import LabModel  # noqa: E402

FIXTURE = ROOT / "tests" / "tui" / "fixtures" / "bookinfo"
VIEW_KEYS = {"cluster": "1", "pods": "2", "flows": "3", "istiod": "4", "events": "5"}


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def model_ceiling(n: int = 50_000) -> float:
    """Events per second LabModel folds (recorded events with fresh flow ids), nothing drawn."""
    b = RecordedBackend(FIXTURE, rate=1e9, loops=n // 180 + 1)
    b.start()
    b.wait_replayed(120)
    msgs = b.drain(limit=n)
    m = LabModel()
    t0 = time.perf_counter()
    m.fold_all(msgs)
    return len(msgs) / (time.perf_counter() - t0)


async def run_view(view: str, rate: float, seconds: float) -> dict:
    events_per_pass = len(RecordedBackend(FIXTURE).events)
    loops = max(1, int(rate * seconds / events_per_pass) + 1)
    backend = RecordedBackend(FIXTURE, rate=rate, loops=loops)
    total = loops * events_per_pass
    app = LabApp(backend)  # the real 10 Hz tick
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press(VIEW_KEYS[view])
        await pilot.pause()
        t0 = time.monotonic()
        late: list[float] = []  # how late a 50 ms sleep wakes up: the event loop's responsiveness
        while backend.replayed < total and time.monotonic() - t0 < seconds * 3:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            late.append((time.monotonic() - t - 0.05) * 1000)
        fed = time.monotonic() - t0
        backlog_at_end = backend.pending()
        while backend.pending() and time.monotonic() - t0 < seconds * 4:
            await asyncio.sleep(0.05)
        drained = time.monotonic() - t0
        await pilot.pause()
        s = app.stats
        busy = [b * 1000 for b in s.busy]
        lags = [x * 1000 for x in s.lags]
        return {
            "view": view, "posted": backend.replayed, "folded": s.folded, "fed_s": fed, "drained_s": drained,
            "rate": backend.replayed / max(1e-9, backend.feed_ended - backend.feed_started), "ticks": s.ticks,
            "tick_ms_mean": statistics.mean(busy) if busy else 0.0, "tick_ms_p95": pct(busy, 95),
            "tick_ms_max": max(busy, default=0.0), "lag_ms_p50": pct(lags, 50), "lag_ms_p95": pct(lags, 95),
            "lag_ms_max": max(lags, default=0.0), "backlog_max": s.max_backlog, "backlog_end": backlog_at_end,
            "sizes": app.model.sizes(), "dropped": backend.dropped,
            "late_ms_p95": pct(late, 95), "late_ms_max": max(late, default=0.0),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=500.0, help="events per second (default 500)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to feed each view (default 10)")
    ap.add_argument("--views", default="flows,events,cluster", help="views to run, comma-separated")
    args = ap.parse_args()

    print(f"model only: {model_ceiling():,.0f} events/s folded (no drawing)")
    print(f"app: {args.rate:.0f} events/s for {args.seconds:.0f} s per view, the app's 10 Hz tick, 140x40 headless")
    ok = True
    for view in args.views.split(","):
        r = asyncio.run(run_view(view.strip(), args.rate, args.seconds))
        keeps_up = r["backlog_end"] < args.rate and r["lag_ms_p95"] < 500 and r["late_ms_p95"] < 100 \
            and r["dropped"] == 0
        ok &= keeps_up
        print(f"  {r['view']:<8} posted {r['posted']:>6} at {r['rate']:.0f}/s, folded {r['folded']:>6} in "
              f"{r['ticks']} ticks; tick {r['tick_ms_mean']:.1f} ms mean, {r['tick_ms_p95']:.1f} p95, "
              f"{r['tick_ms_max']:.1f} max; lag {r['lag_ms_p50']:.0f} ms p50, {r['lag_ms_p95']:.0f} p95, "
              f"{r['lag_ms_max']:.0f} max; loop wake-up late {r['late_ms_p95']:.0f} ms p95, "
              f"{r['late_ms_max']:.0f} max; backlog max {r['backlog_max']}, at end {r['backlog_end']}; "
              f"{'keeps up' if keeps_up else 'FALLS BEHIND'}")
        print(f"           model holds {r['sizes']}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
