"""Size and speed of the study report: HTML size, build + render time, and render time in headless Chromium.

    HF_HUB_OFFLINE=1 python benchmarks/report.py [--trials 20] [--repeats 3] [--keep DIR]
    python benchmarks/report.py --storage sqlite:///studies/cnn3d.db --study NAME   # an existing study

Without --storage it first runs a real 20-trial study with the tuner, in-process, on tiny trials (a 4^3 lattice,
3 epochs over 120 sentences; three parameters, one categorical; the median pruner prunes some), which takes
a minute or two on 2 cores (most of it the teacher embedding the corpus once).

Python side: the data step (``build_report_data``) and the render step (``render_report``) are timed separately,
once cold (first call in the process: imports of optuna.visualization, sklearn, plotly) and then warm (median of
--repeats). Browser side: ``check_in_browser`` loads the page in headless Chromium (software WebGL) --repeats
times; the in-page clock gives when plotly.js was parsed, the load event and when every figure's
``Plotly.newPlot`` promise resolved (plus the probe's 100 ms wait), all from navigation start.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

from tuner.report import check_in_browser, find_chromium, render_report
from tuner.report_data import build_report_data

TINY = {"train.main_epochs": 3, "data.max_sentences": 120, "lattice.size": 4, "lattice.steps": 4}
PARAMS = ["train.lr", "transform.dropout", "transform.kind=linear,attention"]


def run_study(folder: Path, trials: int) -> tuple[str, str]:
    """A real study of ``trials`` finished trials; returns (storage URL, study name)."""
    from tuner.run import ConfigurationTuner
    from tuner.spec import StudySpec

    storage = f"sqlite:///{folder}/studies.db"
    tuner = ConfigurationTuner(storage=storage, tracking_uri=f"sqlite:///{folder}/mlruns/mlflow.db")
    spec = StudySpec(name="bench-report", params=PARAMS, trials=trials, report=False,
                     set={**TINY, "data.cache_dir": str(folder / "cache")})
    started = time.perf_counter()
    summary = tuner.run_study(spec)
    print(f"ran study {summary.study_name}: {summary.finished} complete, {summary.pruned} pruned, "
          f"{summary.failed} failed in {time.perf_counter() - started:.0f} s")
    return storage, summary.study_name


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="use this storage's study instead of running a new one")
    parser.add_argument("--study", help="study name (with --storage)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="run the study and write the report here (kept afterwards)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # system-metrics chatter for every trial
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="cnn3d-report-bench-") as tmp:
        folder = (args.keep or Path(tmp)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        if args.storage:
            if not args.study:
                parser.error("--storage needs --study")
            storage, name = args.storage, args.study
        else:
            storage, name = run_study(folder, args.trials)
        study = optuna.load_study(study_name=name, storage=storage)
        n = len(study.trials)

        data, data_cold = timed(build_report_data, study)
        page, render_cold = timed(render_report, data)
        data_warm = statistics.median(timed(build_report_data, study)[1] for _ in range(args.repeats))
        render_warm = statistics.median(timed(render_report, data)[1] for _ in range(args.repeats))
        path = folder / f"{name}.html"
        path.write_text(page, encoding="utf-8")
        size = path.stat().st_size
        from plotly.offline import get_plotlyjs

        library = len(get_plotlyjs().encode())
        print(f"study {name}: {n} trials; report {path}")
        print(f"html size:   {size / 1e6:.2f} MB (plotly.js {library / 1e6:.2f} MB once, "
              f"figures + tables {(size - library) / 1e3:.0f} kB, {page.count('Plotly.newPlot(')} figures)")
        print(f"data step:   {data_cold:.2f} s cold, {data_warm:.2f} s warm (median of {args.repeats})")
        print(f"render step: {render_cold:.2f} s cold, {render_warm:.2f} s warm (median of {args.repeats})")

        chromium = find_chromium()
        if chromium is None:
            print("browser:     skipped (no chromium on PATH)")
            return 0
        checks = [check_in_browser(path, chromium=chromium) for _ in range(args.repeats)]
        last = checks[-1]
        if last.errors or last.undrawn:
            print(f"browser:     PROBLEM errors={last.errors} undrawn={last.undrawn}")
        med = {k: statistics.median(getattr(c, k) for c in checks)
               for k in ("plotly_loaded_ms", "load_event_ms", "figures_drawn_ms", "process_seconds")}
        print(f"browser:     {len(last.figures)} figures drawn, {len(last.errors)} JS errors; median of {args.repeats}: "
              f"plotly.js parsed {med['plotly_loaded_ms'] / 1e3:.2f} s, load event {med['load_event_ms'] / 1e3:.2f} s, "
              f"all figures drawn {med['figures_drawn_ms'] / 1e3:.2f} s after navigation start; "
              f"chromium process {med['process_seconds']:.1f} s wall")
        print(f"machine:     {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
