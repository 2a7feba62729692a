"""Trials per minute with 1, 2 and 4 local worker processes, PostgreSQL study storage against SQLite.

    HF_HUB_OFFLINE=1 python benchmarks/distributed.py [--workers 1,2,4] [--trials 8] [--repeats 2]

Each configuration runs ``cnn3d-tune --workers N --trials T`` on a fresh study (tiny trials: a 4^3
lattice, 4 steps, one epoch over 120 sentences; random sampler, no pruning) in a fresh store: a new
PostgreSQL database (created and dropped here) or a new SQLite file. MLflow tracking goes to an
embedded SQLite store per configuration. The embedding cache is warmed once beforehand.

Throughput is measured inside the study, from the first trial's start to the last trial's end, so
process start-up and data preparation are left out; the wall time of the whole command is shown
beside it. Ratios are against 1 worker on the same backend, and PostgreSQL against SQLite.
The two backends run back to back for each worker count, and each configuration ``--repeats``
times (the table shows medians), so that background load on a shared machine hits both alike:
tiny trials on few cores are very sensitive to it; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

BIN = Path(sys.executable).parent
TINY = ["--set", "train.main_epochs=1", "--set", "data.max_sentences=120", "--set", "lattice.size=4",
        "--set", "lattice.steps=4"]


@dataclass
class Result:
    backend: str
    workers: int
    complete: int
    span_s: float
    wall_s: float

    @property
    def per_minute(self) -> float:
        return 60.0 * self.complete / self.span_s if self.span_s > 0 else float("nan")


def console(name: str) -> str:
    """A console script of this interpreter's environment."""
    path = BIN / name
    return str(path) if path.exists() else name


def warm_cache(cache_dir: Path) -> None:
    """Embed the built-in corpus once, so no configuration pays for the teacher."""
    subprocess.run([console("cnn3d-cache"), "warm", "--corpus", "builtin", "--cache-dir", str(cache_dir),
                    "--no-progress", "--log-level", "warning"], check=True, env=child_env())


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNN3D_STORAGE")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


class PostgresDatabases:
    """Fresh databases on one PostgreSQL server, dropped on exit."""

    def __init__(self, conninfo: str):
        import psycopg

        self.conninfo = conninfo
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            self.user, self.port = conn.info.user, conn.info.port
            self.host = conn.info.host if conn.info.host.startswith(("127.", "localhost")) else "127.0.0.1"
        self.names: list[str] = []

    def create(self) -> str:
        import psycopg

        name = f"cnn3d_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{name}"

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_config(backend: str, storage: str, workers: int, trials: int, folder: Path, cache_dir: Path,
               threads: int = 0) -> Result:
    """One ``cnn3d-tune --workers N`` run on a fresh study; throughput from the study's own timestamps."""
    name = f"bench-{backend}-{workers}"
    cmd = [console("cnn3d-tune"), "--name", name, "--storage", storage,
           "--tracking-uri", f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}", "--trials", str(trials),
           "--workers", str(workers), "--param", "train.lr", "--param", "transform.dropout",
           "--sampler", "random", "--pruner", "none", *TINY, "--set", f"data.cache_dir={cache_dir}",
           "--set", f"train.num_threads={threads}", "--no-report", "--log-level", "warning"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{backend} with {workers} workers failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    complete = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
    span = (max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)).total_seconds()
    return Result(backend, workers, len(complete), span, wall)


def medians(results: list[Result]) -> list[Result]:
    """One result per (backend, workers): the run with the median throughput."""
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.backend, r.workers), []).append(r)
    chosen = []
    for key in sorted(groups, key=lambda k: (k[0] != "postgresql", k[1])):
        runs = sorted(groups[key], key=lambda r: r.per_minute)
        middle = statistics.median_low([r.per_minute for r in runs])
        chosen.append(next(r for r in runs if r.per_minute == middle))
    return chosen


def table(results: list[Result]) -> str:
    """A Markdown table with ratios against 1 worker (same backend) and PostgreSQL against SQLite."""
    base = {r.backend: r.per_minute for r in results if r.workers == 1}
    sqlite = {r.workers: r.per_minute for r in results if r.backend == "sqlite"}
    lines = ["| storage | workers | trials | trials/min | vs 1 worker | PostgreSQL / SQLite | span s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        vs_one = f"{r.per_minute / base[r.backend]:.2f}x" if r.backend in base else "-"
        vs_sqlite = f"{r.per_minute / sqlite[r.workers]:.2f}x" if r.backend == "postgresql" and r.workers in sqlite else "-"
        lines.append(f"| {r.backend} | {r.workers} | {r.complete} | {r.per_minute:.1f} | {vs_one} | {vs_sqlite} "
                     f"| {r.span_s:.1f} | {r.wall_s:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="Comma-separated worker counts (default 1,2,4).")
    parser.add_argument("--trials", type=int, default=8, help="Finished trials per configuration (default 8).")
    parser.add_argument("--backends", default="postgresql,sqlite", help="postgresql and/or sqlite.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per configuration (median shown; default 2).")
    parser.add_argument("--pg", default=os.environ.get("CNN3D_BENCH_PG", "host=127.0.0.1 port=5432 dbname=postgres"),
                        help="libpq conninfo of a PostgreSQL admin connection (databases are created and dropped).")
    parser.add_argument("--cache-dir", default=None, help="Embedding cache folder (default: a temporary one).")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (train.num_threads; default 0: the tuner's cores / workers).")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, optuna {optuna.__version__}; "
          f"{args.trials} tiny trials per configuration, {args.repeats} run(s) each, "
          f"torch threads {args.threads or 'cores / workers'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    pg = PostgresDatabases(args.pg) if "postgresql" in backends else None
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="cnn3d-bench-dist-") as tmp:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        start = time.perf_counter()
        warm_cache(cache_dir)
        print(f"embedding cache warm in {time.perf_counter() - start:.1f} s")
        try:
            for repeat in range(args.repeats):
                for workers, backend in [(w, b) for w in counts for b in backends]:
                    folder = Path(tmp) / f"{backend}-{workers}-{repeat}"
                    folder.mkdir()
                    storage = pg.create() if backend == "postgresql" else f"sqlite:///{folder / 'study.db'}"
                    result = run_config(backend, storage, workers, args.trials, folder, cache_dir, args.threads)
                    results.append(result)
                    print(f"{backend:10s} {workers} worker(s): {result.complete} trials, "
                          f"{result.per_minute:.1f}/min (wall {result.wall_s:.1f} s)", flush=True)
        finally:
            if pg is not None:
                pg.drop_all()
    print(f"load average {os.getloadavg()[0]:.2f}")
    print()
    print(table(medians(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
