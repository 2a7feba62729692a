"""The study report's render step: ``ReportData`` -> one self-contained HTML page (plotly.js embedded once).

``write_report(study)`` is what ``cnn3d-tune`` and ``cnn3d-report`` call: it runs the data step
(``tuner.report_data.build_report_data``), renders, and writes ``studies/reports/<study>.html``.
Optuna's own figures are reused where they fit (optimisation history, parallel coordinates, contour,
Pareto front); the parameter-effect panels (with baselines and mean ± spread across seeds), the
importance comparison, the learning curves with pruned trials marked, the 3D lattice and the tables
are drawn here. ``check_in_browser`` loads a written page in headless Chromium and reports JavaScript
errors, which figures drew, and render timings (used by the tests and ``benchmarks/report.py``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .report_data import (
    EMERGENCE_METRICS,
    BestTrial,
    EffectPanel,
    Importance,
    LatticeView,
    ParamEffect,
    ReportData,
    build_report_data,
    label,
)

logger = logging.getLogger(__name__)

DEFAULT_REPORT_DIR = Path("studies/reports")
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#8c8c8c", "FAIL": "#d62728", "RUNNING": "#9467bd", "WAITING": "#bcbd22"}
MEAN_COLOR = "#d62728"
BASELINE_STYLE = {"PCA baseline": ("#2ca02c", "dash"), "mean-vector baseline": ("#ff7f0e", "dot"),
                  "untrained cube": ("#8c564b", "dash"), "shuffled control": ("#7f7f7f", "dot")}
NULL_BAND = "rgba(127, 127, 127, 0.15)"  # shaded between an emergence metric's two nulls
SERIES_COLORS = ["#9467bd", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#1f77b4"]
PANEL_COLUMNS = 4


# --------------------------------------------------------------------------- public API


def write_report(study, tracker=None, out: str | Path | None = None,
                 mlflow_ui_base: str = "http://127.0.0.1:5000", mlflow_client: Any = None, analyse: bool = True) -> Path:
    """Build and write the study's HTML report; returns its path (default ``studies/reports/<study>.html``).

    With ``analyse`` the page gains the best trial's ``cnn3d-analyze`` views (``tuner.report_analysis``):
    analysed from its MLflow checkpoint the first time, read back from its run afterwards.

    ``tracker`` (a ``StudyTracker``) or ``mlflow_client`` lets the report read per-epoch metrics from MLflow
    for trials whose history never reached Optuna; links into the MLflow UI use ``mlflow_ui_base``.
    """
    started = time.perf_counter()
    client = mlflow_client or (tracker.client if tracker is not None else None)
    experiment_id = tracker.experiment_id if tracker is not None else None
    data = build_report_data(study, mlflow_client=client, mlflow_ui_base=mlflow_ui_base, experiment_id=experiment_id)
    if analyse and data.best is not None:  # computed once per best trial, then read back from its MLflow run
        from .report_analysis import best_trial_analysis

        data.analysis, data.analysis_note = best_trial_analysis(client, data.best.run_id, data.best.number)
    page = render_report(data)
    path = Path(out) if out else default_report_path(study.study_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    logger.info("wrote report %s (%.1f MB, %.1f s)", path, path.stat().st_size / 1e6, time.perf_counter() - started)
    return path


def default_report_path(study_name: str) -> Path:
    """``studies/reports/<study name>.html`` with characters unsafe in file names replaced."""
    safe = re.sub(r"[^A-Za-z0-9._+=-]+", "_", study_name).strip("._") or "study"
    return DEFAULT_REPORT_DIR / f"{safe}.html"


@dataclass
class Section:
    """A titled part of the page: an introduction and a list of items (figures, HTML, notes)."""

    anchor: str
    title: str
    intro: str = ""
    items: list[Any] = field(default_factory=list)  # go.Figure | Html | Note


@dataclass
class Html:
    """Trusted HTML made by this module."""

    markup: str


@dataclass
class Note:
    """A sentence saying what is missing, shown where the figure would be."""

    text: str


def build_sections(data: ReportData) -> list[Section]:
    """The page's sections, in reading order (figures are plotly ``Figure`` objects, not yet HTML).

    A section that fails to build becomes a note naming the error: the rest of the page still renders.
    """
    builders = [(_effects_section, "effects", "Parameter effects"), (_importance_section, "importance", "Importance"),
                (_progress_section, "progress", "Optimisation history"), (_best_section, "best", "Best trial"),
                (_trials_section, "trials", "All trials")]
    if any(k.startswith("cl_matrix/") for t in data.complete for k in t.metrics):  # a study over data.domains
        builders.insert(4, (_continual_section, "continual", "Continual learning"))
    if data.analysis is not None or data.analysis_note:  # write_report looked for the best trial's analysis
        builders.insert(4, (_analysis_section, "analysis", "Best trial analysis"))
    if any(_transferred(_setting(data, t, "train.init_from")) for t in data.trials):  # issue 11
        builders.insert(3, (_transfer_section, "transfer", "Transfer between sizes"))
    sections = []
    for build, anchor, title in builders:
        try:
            sections.append(build(data))
        except Exception as exc:  # noqa: BLE001 - one odd trial must not cost the researcher the whole page
            logger.warning("report section %r failed", title, exc_info=True)
            sections.append(Section(anchor, title, items=[Note(f"This section could not be drawn: "
                                                               f"{type(exc).__name__}: {exc}".splitlines()[0])]))
    return sections


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string (plotly.js inline, once)."""
    from plotly.offline import get_plotlyjs

    sections = build_sections(data)
    counter = iter(range(1, 10_000))
    body = [_header(data), _toc(sections)]
    for section in sections:
        body.append(_render_section(section, counter))
    title = html.escape(f"Study report: {data.study_name}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
        f"<style>{CSS}</style>\n<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n"
        f"<body>\n<main>\n{''.join(body)}\n<footer>Written {datetime.now():%Y-%m-%d %H:%M} by cnn3d-report.</footer>"
        "\n</main>\n</body></html>\n"
    )


# --------------------------------------------------------------------------- page frame


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1400px;margin:0 auto;padding:16px 24px}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.2em 0 .3em}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:.6em 0}
.meta dt{font-weight:600;color:#555}.meta dd{margin:0}
.notice{background:#fff6d5;border-left:4px solid #e0b400;padding:8px 12px;margin:8px 0}
.note{color:#666;font-style:italic;margin:6px 0 12px}
.intro{color:#444;max-width:1000px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.92em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#2a7d2a}.bad{color:#b22}
.figure{background:#fff;border:1px solid #e5e5e5;margin:10px 0;padding:4px}
nav ul{columns:3;margin:.3em 0}
footer{color:#888;margin:2em 0 1em;font-size:.85em}
code{background:#f0f0f0;padding:0 3px}
"""


def _header(data: ReportData) -> str:
    c = data.counts
    objectives = ", ".join(o.label for o in data.objectives) or "unknown"
    counts = (f"{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed"
              + (f", {c['RUNNING']} running" if c["RUNNING"] else "") + (f", {c['WAITING']} waiting" if c["WAITING"] else ""))
    rows = [
        ("Objective" + ("s" if data.multi_objective else ""), html.escape(objectives)),
        ("Trials", html.escape(counts)),
        ("Wall time", html.escape(_wall(data))),
        ("Tuned", html.escape("; ".join(f"{p.key}: {p.describe()}" for p in data.params) or "nothing")),
        ("Preset", html.escape(str(data.preset or "unknown"))),
        ("Fixed (--set)", html.escape(", ".join(f"{k}={v}" for k, v in data.fixed.items()) or "none")),
        ("MLflow", _mlflow_cell(data)),
    ]
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    notices = "".join(f"<div class=\"notice\">{html.escape(n)}</div>" for n in data.notices)
    return (f"<header><h1>Study <code>{html.escape(data.study_name)}</code></h1><dl class=\"meta\">{meta}</dl>"
            f"{notices}{_best_summary(data)}</header>")


def _wall(data: ReportData) -> str:
    if data.wall_seconds is None:
        return "no trial has finished"
    busy = sum(t.duration_s or 0 for t in data.trials)
    return (f"{_duration(data.wall_seconds)} ({data.started:%Y-%m-%d %H:%M} to {data.ended:%H:%M}); "
            f"{_duration(busy)} of trial time")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _mlflow_cell(data: ReportData) -> str:
    parts = []
    if data.experiment_url:
        parts.append(_link(data.experiment_url, "all runs of this study"))
    if data.parent_run_url:
        parts.append(_link(data.parent_run_url, "the study's parent run"))
    if not parts:
        return "no MLflow experiment recorded"
    hint = ""
    if data.tracking_uri:
        hint = (f" (start the UI with <code>mlflow ui --backend-store-uri {html.escape(data.tracking_uri)}</code>"
                " for these links to open)")
    return " · ".join(parts) + hint


def _best_summary(data: ReportData) -> str:
    best = data.best
    if best is None:
        return "<h3>Best trial</h3><p class=\"note\">No complete trial, so no best trial yet.</p>"
    values = ", ".join(f"{html.escape(label(k))} = {_fmt(v)}" for k, v in best.values.items())
    params = ", ".join(f"{html.escape(k)} = {html.escape(_fmt(v))}" for k, v in best.params.items())
    link = f" · {_link(best.run_url, 'MLflow run')}" if best.run_url else ""
    pareto = ""
    if data.multi_objective:
        pareto = (f"<p>{len(data.pareto)} trial(s) on the Pareto front: "
                  f"{', '.join(map(str, data.pareto))}; detailed below is the best on the first objective.</p>")
    title = "Best trial" if not data.multi_objective else "A Pareto-optimal trial"
    return (f"<h3>{title}: #{best.number}{link}</h3><p>{values}<br>{params or 'no tuned parameters'}</p>{pareto}"
            f"{_diff_table(best)}")


def _diff_table(best: BestTrial) -> str:
    if not best.config_diff:
        why = best.note.split(". ")[0] if "config" in best.note else "the best trial uses the preset's defaults"
        return f"<p class=\"note\">Config diff: {html.escape(why)}.</p>"
    rows = "".join(
        f"<tr><td><code>{html.escape(r.key)}</code></td><td>{html.escape(_fmt(r.default))}</td>"
        f"<td><b>{html.escape(_fmt(r.value))}</b></td><td>{html.escape(r.source)}</td></tr>"
        for r in best.config_diff
    )
    return ("<details open><summary>Its config, where it differs from the preset's defaults</summary>"
            f"<table><tr><th>key</th><th>default</th><th>best trial</th><th>from</th></tr>{rows}</table></details>")


def _toc(sections: list[Section]) -> str:
    items = "".join(f"<li><a href=\"#{s.anchor}\">{html.escape(s.title)}</a></li>" for s in sections)
    return f"<nav><ul>{items}</ul></nav>"


def _render_section(section: Section, counter) -> str:
    parts = [f"<section id=\"{section.anchor}\"><h2>{html.escape(section.title)}</h2>"]
    if section.intro:
        parts.append(f"<p class=\"intro\">{section.intro}</p>")
    for item in section.items:
        if isinstance(item, go.Figure):
            parts.append(_figure_html(item, f"fig-{section.anchor}-{next(counter)}"))
        elif isinstance(item, Html):
            parts.append(item.markup)
        elif isinstance(item, Note):
            parts.append(f"<p class=\"note\">{html.escape(item.text)}</p>")
    parts.append("</section>\n")
    return "".join(parts)


def _figure_html(fig: go.Figure, div_id: str) -> str:
    markup = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOTLY_CONFIG,
                         default_height=f"{fig.layout.height or 450}px")
    return f"<div class=\"figure\" data-figure=\"{div_id}\">{markup}</div>\n"


def _link(url: str, text: str) -> str:
    return f"<a href=\"{html.escape(url)}\" target=\"_blank\" rel=\"noopener\">{html.escape(text)}</a>"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------- parameter effects


def _effects_section(data: ReportData) -> Section:
    section = Section("effects", "Parameter effects: quality, speed, memory, emergence", intro=(
        "For each tuned parameter (most important first), every panel plots a final metric against the "
        "parameter's value: the objective(s) and decoding quality first, then throughput and peak memory "
        "(the cost of quality), then the emergence metrics. Blue dots are complete trials; grey crosses are pruned "
        "trials at their last epoch (on the quality panels only, unless no trial completed). Where a value was run with several seeds, the red line is the mean and its "
        "bars one standard deviation: an effect is believable when the means move by more than the bars "
        "(the panel title gives that ratio as <i>effect/noise</i>). Dashed lines are the in-run baselines "
        "(PCA through the same face size, and predicting the mean vector). On the emergence panels the two nulls "
        "measured in the same run are drawn instead, with the band between them shaded: the untrained cube "
        "(same seed, initial weights) and a shuffled control (see docs/emergence.md); a value inside or below "
        "the band is nothing the nulls do not show too."))
    if not data.effects:
        section.items.append(Note("No tuned parameter to show."))
    for effect in data.effects:
        section.items.append(Html(f"<h3><code>{html.escape(effect.param.key)}</code> "
                                  f"<small>({html.escape(effect.param.describe())})</small></h3>"))
        if effect.note:
            section.items.append(Note(effect.note))
        if effect.panels:
            section.items.append(effect_figure(effect))
    return section


def effect_figure(effect: ParamEffect) -> go.Figure:
    """One figure per parameter: a subplot per metric."""
    panels = effect.panels
    cols = min(PANEL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    titles = [_panel_title(p) for p in panels]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.07,
                        vertical_spacing=min(0.3, 0.5 / rows) if rows > 1 else 0.2)
    legend_seen: set[str] = set()
    for i, panel in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        for trace in _panel_traces(effect, panel, legend_seen):
            fig.add_trace(trace, row=row, col=col)
        _style_x(fig, effect, row, col)
    fig.update_annotations(font_size=12)
    fig.update_layout(height=290 * rows + 140, margin={"t": 60, "b": 110, "l": 50, "r": 20},
                      legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom", "x": 0.0},
                      hovermode="closest", template="plotly_white")
    return fig


def _panel_title(panel: EffectPanel) -> str:
    title = panel.title
    if panel.effect_to_noise is not None:
        ratio = "∞" if math.isinf(panel.effect_to_noise) else f"{panel.effect_to_noise:.1f}×"
        title += f"<br><sup>effect/noise {ratio}</sup>"
    return title


def _x(effect: ParamEffect, x: Any) -> Any:
    return str(x) if effect.param.kind == "categorical" else x


def _panel_traces(effect: ParamEffect, panel: EffectPanel, legend_seen: set[str]) -> list[go.Scatter]:
    traces = []
    multi = len(panel.series) > 1
    for s_index, series in enumerate(panel.series):
        color = SERIES_COLORS[s_index % len(SERIES_COLORS)] if multi else COLORS["COMPLETE"]
        for state, symbol, name in (("COMPLETE", "circle", "complete trial"), ("PRUNED", "x-thin-open", "pruned (last epoch)")):
            points = [p for p in panel.points if p.state == state and p.series == series]
            if not points:
                continue
            legend = f"expert {series}" if multi and state == "COMPLETE" else name
            traces.append(go.Scatter(
                x=[_x(effect, p.x) for p in points], y=[p.y for p in points], mode="markers",
                marker={"color": color if state == "COMPLETE" else COLORS["PRUNED"], "symbol": symbol, "size": 7,
                        "opacity": 0.6 if panel.groups else 0.85, "line": {"width": 1.5}},
                name=legend, legendgroup=legend, showlegend=_first(legend, legend_seen),
                customdata=[[p.trial, "" if p.seed is None else p.seed] for p in points],
                hovertemplate=f"trial %{{customdata[0]}} (seed %{{customdata[1]}})<br>{html.escape(effect.param.key)}"
                              f"=%{{x}}<br>{html.escape(panel.title)}{(' ' + series) if series else ''}=%{{y:.4g}}"
                              "<extra></extra>",
            ))
        groups = [g for g in panel.groups if g.series == series]
        if groups:
            legend = f"expert {series}: mean ± std" if multi else "mean ± std across seeds"
            traces.append(go.Scatter(
                x=[_x(effect, g.x) for g in groups], y=[g.mean for g in groups], mode="lines+markers",
                error_y={"type": "data", "array": [g.std for g in groups], "visible": True},
                line={"color": MEAN_COLOR if not multi else color, "width": 2}, marker={"size": 8},
                name=legend, legendgroup=legend, showlegend=_first(legend, legend_seen),
                customdata=[g.n for g in groups],
                hovertemplate="%{x}: mean %{y:.4g} ± %{error_y.array:.3g} (n=%{customdata})<extra></extra>",
            ))
    for name, points in panel.baselines.items():
        color, dash = BASELINE_STYLE.get(name, ("#555", "dash"))
        xs = [_x(effect, x) for x, _ in points]
        ys = [y for _, y in points]
        if len(points) == 1 or max(ys) - min(ys) < 1e-9:
            xs = _span(effect, panel, xs)
            ys = [ys[0]] * len(xs)
        band = panel.role == "emergence" and name == "shuffled control" and "untrained cube" in panel.baselines
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", line={"color": color, "dash": dash, "width": 1.5},
                                 name=name, legendgroup=name, showlegend=_first(name, legend_seen),
                                 fill="tonexty" if band else None, fillcolor=NULL_BAND if band else None,
                                 hovertemplate=f"{name}: %{{y:.4g}}<extra></extra>"))
    return traces


def _span(effect: ParamEffect, panel: EffectPanel, xs: list[Any]) -> list[Any]:
    """X positions for a constant reference line: the panel's smallest and largest values (or every category)."""
    values = [_x(effect, p.x) for p in panel.points] or xs
    if effect.param.kind == "categorical":
        return list(dict.fromkeys(str(c) for c in (effect.param.choices or values)))
    return [min(values), max(values)]


def _first(name: str, seen: set[str]) -> bool:
    if name in seen:
        return False
    seen.add(name)
    return True


def _style_x(fig: go.Figure, effect: ParamEffect, row: int, col: int) -> None:
    param = effect.param
    kwargs: dict[str, Any] = {"title_text": param.key, "title_font_size": 11}
    if param.kind == "categorical":
        kwargs.update(type="category", categoryorder="array", categoryarray=[str(c) for c in param.choices or []])
    elif param.log:
        kwargs.update(type="log")
    fig.update_xaxes(row=row, col=col, **kwargs)


# --------------------------------------------------------------------------- importance, parallel, contour


def _importance_section(data: ReportData) -> Section:
    section = Section("importance", "Which parameters matter", intro=(
        "Importance says how much of the objective's variation each parameter explains, estimated from the "
        "complete trials by two evaluators: <b>PED-ANOVA</b> (Optuna 5's default: how differently the best "
        "trials' parameters are distributed from all trials') and <b>fANOVA</b> (variance decomposition of a "
        "random forest fitted to the trials). When they disagree, the ranking is not settled yet. Parallel "
        "coordinates show every complete trial as a line through its parameter values to its objective; the "
        "contour shows the objective over the two most important parameters."))
    if len(data.params) < 2:
        section.items.append(Note("Importance, parallel coordinates and the contour need at least two tuned "
                                  "parameters; this study tunes " + (data.params[0].key if data.params else "none")
                                  + ". Its effect is shown above."))
        return section
    if not data.complete:
        section.items.append(Note("No complete trial yet: nothing to rank."))
        return section
    fig = importance_figure(data.importances)
    notes = [imp.note for imp in data.importances if imp.note]
    section.items.extend(Note(n) for n in dict.fromkeys(notes))
    if fig is not None:
        section.items.append(fig)
    study = data.light_study()
    target, name = _target(data, 0)
    section.items.append(_optuna_figure("parallel coordinates", _parallel, study, target, name))
    if data.top_pair:
        section.items.append(_optuna_figure(
            f"contour of {data.top_pair[0]} × {data.top_pair[1]}", _contour, study, target, name, list(data.top_pair)))
    return section


def importance_figure(importances: list[Importance]) -> go.Figure | None:
    """Horizontal grouped bars: a bar per (evaluator, objective) for each parameter."""
    usable = [imp for imp in importances if imp.values]
    if not usable:
        return None
    params = sorted({k for imp in usable for k in imp.values}, key=lambda k: max(i.values.get(k, 0) for i in usable))
    objectives = {imp.objective for imp in usable}
    fig = go.Figure()
    for imp in usable:
        name = imp.evaluator + (f" ({label(imp.objective)})" if len(objectives) > 1 else "")
        fig.add_trace(go.Bar(y=params, x=[imp.values.get(p, 0.0) for p in params], orientation="h", name=name,
                             hovertemplate="%{y}: %{x:.3f}<extra>" + html.escape(name) + "</extra>"))
    title = "Parameter importance (" + " vs ".join(dict.fromkeys(i.evaluator for i in usable)) + ")"
    fig.update_layout(barmode="group", title=title, xaxis_title="importance (sums to 1 per evaluator)",
                      height=max(260, 60 + 40 * len(params) * len(usable)), template="plotly_white",
                      margin={"l": 180, "t": 50})
    return fig


def _target(data: ReportData, index: int):
    if not data.multi_objective:
        return None, data.objectives[0].label if data.objectives else "objective"
    return (lambda t: t.values[index]), data.objectives[index].label


def _parallel(study, target, name, *extra):
    import optuna.visualization as vis

    fig = vis.plot_parallel_coordinate(study, target=target, target_name=name)
    fig.update_layout(title=f"Parallel coordinates: complete trials, coloured by {name}")
    return fig


def _contour(study, target, name, params):
    import optuna.visualization as vis

    fig = vis.plot_contour(study, params=params, target=target, target_name=name)
    fig.update_layout(height=520, title=f"Contour of {name} over the two most important parameters")
    return fig


def _optuna_figure(what: str, make, *args) -> go.Figure | Note:
    """Call an ``optuna.visualization`` function; an exception or an empty figure becomes a note."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = make(*args)
    except Exception as exc:  # noqa: BLE001 - Optuna raises on degenerate studies; the page says why
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Note(f"No {what}: {first}")
    if not fig.data:
        return Note(f"No {what}: too few complete trials with distinct values.")
    fig.update_layout(template="plotly_white")
    return fig


# --------------------------------------------------------------------------- progress


def _progress_section(data: ReportData) -> Section:
    section = Section("progress", "Optimisation history and learning curves", intro=(
        "The history shows each complete trial's objective in the order it ran, with the best so far. The "
        "learning curves show every trial's metrics per epoch (choose the metric in the menu); pruned trials are "
        "grey dashed lines ending in a cross where the pruner stopped them, failed trials red dotted lines."))
    if data.complete:
        study = data.light_study()
        for i in range(len(data.objectives)):
            target, name = _target(data, i)
            section.items.append(_optuna_figure(f"optimisation history of {name}", _history, study, target, name))
    else:
        section.items.append(Note("No optimisation history: no trial has completed."))
    curves = learning_curve_figure(data)
    section.items.append(curves if curves is not None else Note("No learning curves: no trial reported an epoch."))
    if data.multi_objective:
        if len(data.objectives) > 3:
            section.items.append(Note("No Pareto front plot: Optuna draws it for 2 or 3 objectives only."))
        elif data.complete:
            section.items.append(_optuna_figure("Pareto front", _pareto, data.light_study(),
                                                [o.label for o in data.objectives]))
    return section


def _history(study, target, name):
    import optuna.visualization as vis

    fig = vis.plot_optimization_history(study, target=target, target_name=name)
    fig.update_layout(title=f"Optimisation history: {name}")
    return fig


def _pareto(study, names):
    import optuna.visualization as vis

    return vis.plot_pareto_front(study, target_names=names)


def learning_curve_figure(data: ReportData) -> go.Figure | None:
    """A line per trial and epoch; a menu switches the metric. Pruned trials dashed with a cross at the end."""
    curves = data.curves
    if not curves.trials or not curves.metrics:
        return None
    states = {t.number: t.state for t in data.trials}
    best = data.best.number if data.best else None
    first = curves.metrics[0]
    fig = go.Figure()
    seen: set[str] = set()
    numbers = sorted(curves.trials)
    for number in numbers:
        state = states.get(number, "COMPLETE")
        xs, ys = curves.trials[number].get(first, ([], []))
        legend = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(state, state.lower())
        if number == best:
            legend = f"best (#{best})"
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=legend, legendgroup=legend, showlegend=_first(legend, seen),
            line={"color": "#000" if number == best else COLORS.get(state, "#555"),
                  "dash": {"PRUNED": "dash", "FAIL": "dot"}.get(state, "solid"), "width": 3 if number == best else 1.3},
            marker={"symbol": _end_symbols(len(xs), state), "size": _end_sizes(len(xs), state)},
            opacity=1.0 if number == best else 0.75,
            hovertemplate=f"trial {number} ({state.lower()})<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    buttons = []
    for metric in curves.metrics:
        per = [curves.trials[n].get(metric, ([], [])) for n in numbers]
        buttons.append({"label": label(metric), "method": "update", "args": [
            {"x": [list(x) for x, _ in per], "y": [list(y) for _, y in per],
             "marker.symbol": [_end_symbols(len(x), states.get(n, "COMPLETE")) for n, (x, _) in zip(numbers, per)],
             "marker.size": [_end_sizes(len(x), states.get(n, "COMPLETE")) for n, (x, _) in zip(numbers, per)]},
            {"yaxis.title.text": label(metric)}]})
    fig.update_layout(
        title="Learning curves of all trials", xaxis_title="epoch", yaxis_title=label(first), height=460,
        template="plotly_white", hovermode="closest",
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15,
                      "yanchor": "top", "showactive": True}] if len(buttons) > 1 else [],
    )
    fig.update_xaxes(dtick=1 if max((len(c.get(first, ([],))[0]) for c in curves.trials.values()), default=0) <= 20
                     else None)
    return fig


def _end_symbols(n: int, state: str) -> list[str]:
    end = {"PRUNED": "x", "FAIL": "x-open"}.get(state, "circle")
    return ["circle"] * max(0, n - 1) + [end] if n else []


def _end_sizes(n: int, state: str) -> list[int]:
    return [4] * max(0, n - 1) + [11 if state in ("PRUNED", "FAIL") else 4] if n else []


# --------------------------------------------------------------------------- best trial


def _best_section(data: ReportData) -> Section:
    title = "Best trial: what it decodes and what its lattice does" if not data.multi_objective \
        else "A Pareto-optimal trial: what it decodes and what its lattice does"
    section = Section("best", title, intro=(
        "The best trial's final metrics beside the in-run baselines, its decoded validation examples "
        "(the student's output decoded to the nearest sentence of the bank) and its lattice for one input: "
        "every cell is a dot (depth z = 0 is the input face); colour by activation (mean |state|) or, "
        "with the buttons, by the expert with the largest gate."))
    best = data.best
    if best is None:
        section.items.append(Note("No complete trial, so there is no best trial to show."))
        return section
    section.items.append(Html(_best_metrics_table(best)))
    if any(f"{name}_excess" in best.metrics for name in EMERGENCE_METRICS):
        section.items.append(Html(emergence_table(best.metrics)))
    if best.note:
        section.items.append(Note(best.note))
    if best.examples:
        section.items.append(Html(examples_table(best.examples)))
    if best.lattice is not None:
        section.items.append(lattice_figure(best.lattice))
    return section


def _analysis_section(data: ReportData) -> Section:
    """The best trial's ``cnn3d-analyze`` views: emergence, information flow, probes, similarity, decoding."""
    from .report_analysis import ANALYSIS_PAGE, analysis_figures

    section = Section("analysis", f"Best trial {data.best.number if data.best else ''}: inside the cube", intro=(
        "What <code>cnn3d-analyze</code> shows, for the best trial's final weights, each beside the untrained cube "
        "(same seed, initial weights) and, where one exists, a shuffled control, chance or the teacher (the ceiling). "
        f"Computed once when the report was first written; the full page is the run's <code>{ANALYSIS_PAGE}</code> "
        "artifact."))
    if data.analysis is None:
        section.items.append(Note(data.analysis_note or "No analysis of the best trial."))
        return section
    from cnn3d.analysis_page import edits_note
    from cnn3d.analysis_page import emergence_table as analysis_emergence_table

    section.items.append(Html(analysis_emergence_table(data.analysis.emergence)))
    for title, fig in analysis_figures(data.analysis):
        section.items.append(Html(f"<h3>{html.escape(title)}</h3>"))
        section.items.append(fig)
    if near := edits_note(data.analysis):  # decoding among one-word edits, under the bank-size figure
        section.items.append(Html(near))
    return section


def _best_metrics_table(best: BestTrial) -> str:
    m = best.metrics
    rows = []
    for key in ("val_cosine", "baseline_pca_cosine", "baseline_mean_cosine", "decode_top1", "decode_top5", "val_mse",
                "throughput_samples_per_s", "peak_memory_mb", "effective_dim", "cell_specialization",
                "expert_usage_entropy"):
        if key in m:
            rows.append((label(key), _fmt(m[key])))
    if "val_cosine" in m and m.get("baseline_pca_cosine"):
        rows.insert(3, ("share of the PCA baseline", f"{m['val_cosine'] / m['baseline_pca_cosine']:.0%}"))
    if not rows:
        return "<p class=\"note\">The best trial stored no final metrics.</p>"
    body = "".join(f"<tr><td>{html.escape(k)}</td><td class=\"num\">{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table><tr><th>final metric</th><th>value</th></tr>{body}</table>"


def emergence_table(metrics: dict[str, float]) -> str:
    """Every emergence metric beside its two nulls, the excess ± bootstrap std and a plain verdict."""
    from cnn3d.analysis import verdict

    rows = []
    for name in EMERGENCE_METRICS:
        if f"{name}_excess" not in metrics:
            continue
        ex, sd = metrics[f"{name}_excess"], metrics.get(f"{name}_excess_std", 0.0)
        cells = [label(name), _fmt(metrics.get(name)), _fmt(metrics.get(f"{name}_null_untrained")),
                 _fmt(metrics.get(f"{name}_null_shuffled")), f"{ex:+.4g} ± {sd:.2g}", verdict(name, metrics)]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("emergence metric", "trained", "untrained cube", "shuffled control",
                                              "excess ± std", "verdict (|excess| > 2 std)"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def examples_table(examples: list[dict[str, Any]]) -> str:
    """Decoded examples as ``input → decoded`` rows, with score and a tick when decoding was exact."""
    correct = sum(bool(e.get("correct")) for e in examples)
    rows = "".join(
        f"<tr><td>{html.escape(str(e.get('input', '')))}</td><td>→</td>"
        f"<td>{html.escape(str(e.get('decoded', '')))}</td><td class=\"num\">{_fmt(e.get('score'))}</td>"
        f"<td class=\"{'ok' if e.get('correct') else 'bad'}\">{'✓' if e.get('correct') else '✗'}</td></tr>"
        for e in examples
    )
    return (f"<h3>Decoded examples ({correct} of {len(examples)} exact)</h3><table class=\"examples\">"
            f"<tr><th>input</th><th></th><th>decoded</th><th>cosine</th><th>exact</th></tr>{rows}</table>")


def lattice_figure(view: LatticeView) -> go.Figure:
    """Scatter3d of every (downsampled) cell; buttons switch colour between activation and dominant expert."""
    zs, ys, xs = view.coordinates()
    top = max(view.activation) or 1.0
    fig = go.Figure()
    fig.add_trace(go.Scatter3d(
        x=xs, y=ys, z=zs, mode="markers", name="activation",
        marker={"size": [3 + 7 * a / top for a in view.activation], "color": view.activation, "colorscale": "Viridis",
                "colorbar": {"title": {"text": "mean |state|"}, "x": 1.0}, "opacity": 0.85},
        hovertemplate="cell x=%{x} y=%{y} z=%{z}<br>activation %{marker.color:.3g}<extra></extra>",
    ))
    experts = sorted(set(view.dominant_expert))
    for e in experts:
        idx = [i for i, d in enumerate(view.dominant_expert) if d == e]
        name = view.expert_names[e] if e < len(view.expert_names) else f"expert {e}"
        fig.add_trace(go.Scatter3d(
            x=[xs[i] for i in idx], y=[ys[i] for i in idx], z=[zs[i] for i in idx], mode="markers",
            name=f"{name} ({len(idx)} cells)", visible=False,
            marker={"size": 5, "color": SERIES_COLORS[e % len(SERIES_COLORS)], "opacity": 0.85},
            hovertemplate=f"cell x=%{{x}} y=%{{y}} z=%{{z}}<br>dominant expert: {html.escape(name)}<extra></extra>",
        ))
    n = len(fig.data)
    buttons = [{"label": "colour by activation", "method": "update",
                "args": [{"visible": [True] + [False] * (n - 1)}, {"showlegend": False}]}]
    if experts:
        buttons.append({"label": "colour by dominant expert", "method": "update",
                        "args": [{"visible": [False] + [True] * (n - 1)}, {"showlegend": True}]})
    stride = f" (cells averaged in {view.stride}³ blocks)" if view.stride > 1 else ""
    text = view.input if len(view.input) <= 90 else view.input[:87] + "..."
    fig.update_layout(
        title={"text": f"Lattice {'×'.join(map(str, view.dims))}{stride} for: “{html.escape(text, quote=False)}”", "y": 0.98,
               "yanchor": "top"}, height=660,
        showlegend=False, template="plotly_white", margin={"l": 0, "r": 0, "t": 90, "b": 0},
        scene={"xaxis_title": "x (width)", "yaxis_title": "y (height)", "zaxis_title": "z (depth; 0 = input face)",
               "aspectmode": "data", "camera": {"eye": {"x": 1.6, "y": -1.6, "z": 0.9}}},
        updatemenus=[{"type": "buttons", "direction": "right", "buttons": buttons, "x": 0.0, "xanchor": "left",
                      "y": 1.0, "yanchor": "bottom", "pad": {"b": 4}}],
        legend={"x": 0.0, "y": 0.9},
    )
    return fig


# --------------------------------------------------------------------------- trials table


def _trials_section(data: ReportData) -> Section:
    section = Section("trials", "All trials", intro="Every trial with its state, objective value(s), parameters, "
                      "seed, duration and MLflow run; pruned and failed trials say when and why.")
    if not data.trials:
        section.items.append(Note("The study has no trials."))
        return section
    section.items.append(Html(trials_table(data)))
    return section


def trials_table(data: ReportData) -> str:
    """An HTML table of every trial."""
    keys = [p.key for p in data.params]
    head = ("<tr><th>#</th><th>state</th>" + "".join(f"<th>{html.escape(label(o.metric))}</th>" for o in data.objectives)
            + "".join(f"<th><code>{html.escape(k)}</code></th>" for k in keys)
            + "<th>seed</th><th>duration</th><th>note</th><th>MLflow</th></tr>")
    rows = []
    for t in data.trials:
        values = t.values or [None] * len(data.objectives)
        note = ""
        if t.state == "PRUNED":
            note = f"pruned at epoch {t.pruned_at_epoch}" if t.pruned_at_epoch else "pruned"
        elif t.fail_reason:
            note = t.fail_reason
        rows.append(
            f"<tr><td class=\"num\">{t.number}</td><td style=\"color:{COLORS.get(t.state, '#222')}\">{t.state.lower()}</td>"
            + "".join(f"<td class=\"num\">{'' if v is None else _fmt(v)}</td>" for v in values)
            + "".join(f"<td>{html.escape(_fmt(t.params[k])) if k in t.params else ''}</td>" for k in keys)
            + f"<td class=\"num\">{'' if t.seed is None else t.seed}</td>"
            + f"<td class=\"num\">{'' if t.duration_s is None else _duration(t.duration_s)}</td>"
            + f"<td>{html.escape(note)}</td><td>{_link(t.run_url, 'run') if t.run_url else ''}</td></tr>"
        )
    return f"<table class=\"trials\">{head}{''.join(rows)}</table>"


# --------------------------------------------------------------------------- headless browser check


PROBE_HEAD = """<script>
window.__probe = {errors: [], t0: performance.now()};
window.addEventListener('error', function (e) { window.__probe.errors.push(String(e.message || e)); });
window.addEventListener('unhandledrejection', function (e) { window.__probe.errors.push('unhandled: ' + e.reason); });
(function () { var orig = console.error; console.error = function () {
  window.__probe.errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
</script>"""

PROBE_BODY = """<script>
window.__probe.plotlyLoaded = performance.now();
window.__probe.promises = [];
if (window.Plotly) { var __np = Plotly.newPlot; Plotly.newPlot = function () {
  var p = __np.apply(this, arguments); window.__probe.promises.push(p); return p; }; }
window.addEventListener('load', function () {
  window.__probe.loaded = performance.now();
  Promise.all(window.__probe.promises).then(function () { setTimeout(function () {
    var figs = [];
    document.querySelectorAll('.plotly-graph-div').forEach(function (gd) {
      var svg = gd.querySelector('.main-svg'); var r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
      var marks = gd.querySelectorAll('g.trace, g.point, path.point, .bars path, .contour, g.hm image, canvas').length;
      var canvases = Array.prototype.filter.call(gd.querySelectorAll('canvas'), function (c) { return c.width > 0 && c.height > 0; }).length;
      figs.push({id: gd.id, width: r.width, height: r.height, traces: (gd.data || []).length, marks: marks,
                 canvases: canvases, gl: !!gd.querySelector('.gl-container')});
    });
    var out = {errors: window.__probe.errors, figures: figs, plotly_loaded_ms: window.__probe.plotlyLoaded,
               load_event_ms: window.__probe.loaded, figures_drawn_ms: performance.now(),
               head_start_ms: window.__probe.t0, webgl_missing: document.body.innerText.indexOf('WebGL is not supported') >= 0};
    var pre = document.createElement('pre'); pre.id = '__probe_result'; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }, 100); }, function (e) { window.__probe.errors.push('newPlot failed: ' + e); });
});
</script>"""

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")


@dataclass
class BrowserCheck:
    """What headless Chromium saw: JS errors, each figure's size and marks, timings (ms since navigation)."""

    errors: list[str]
    figures: list[dict[str, Any]]
    plotly_loaded_ms: float
    load_event_ms: float
    figures_drawn_ms: float
    process_seconds: float
    screenshot: Path | None = None
    webgl_missing: bool = False

    @property
    def undrawn(self) -> list[str]:
        """Ids of figures with an empty plot area or nothing drawn in it."""
        return [f["id"] for f in self.figures
                if f["width"] <= 0 or f["height"] <= 0 or f["traces"] == 0 or (f["marks"] == 0 and f["canvases"] == 0)]


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH (Debian's ``chromium`` first)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def check_in_browser(page: str | Path, screenshot: str | Path | None = None, chromium: str | None = None,
                     budget_ms: int = 15000, window: tuple[int, int] = (1400, 4000), timeout: float = 120) -> BrowserCheck:
    """Load a copy of ``page`` with a probe script in headless Chromium; optionally screenshot the original."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    probed = text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("<body>", "<body>" + PROBE_BODY, 1)
    with tempfile.TemporaryDirectory(prefix="cnn3d-report-check-") as tmp:
        copy = Path(tmp) / page.name
        copy.write_text(probed, encoding="utf-8")
        for attempt in range(3):  # a starved machine can end the virtual-time budget before the page drew
            started = time.perf_counter()
            dom = _chromium(chromium, tmp, ["--dump-dom", f"--virtual-time-budget={budget_ms * 2**attempt}",
                                            copy.as_uri()], timeout)
            seconds = time.perf_counter() - started
            match = re.search(r'<pre id="__probe_result">(.*?)</pre>', dom, re.S)
            if match:
                break
            logger.warning("chromium dumped %s before it finished drawing; trying again", page.name)
        shot = None
        if screenshot:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            _chromium(chromium, tmp, [f"--screenshot={shot}", f"--window-size={window[0]},{window[1]}",
                                      f"--virtual-time-budget={budget_ms}", page.as_uri()], timeout)
    if not match:
        raise RuntimeError(f"{page.name} never finished drawing in chromium (no probe result in the DOM)")
    result = json.loads(html.unescape(match.group(1)))
    return BrowserCheck(
        errors=result["errors"], figures=result["figures"], plotly_loaded_ms=result["plotly_loaded_ms"],
        load_event_ms=result["load_event_ms"], figures_drawn_ms=result["figures_drawn_ms"], process_seconds=seconds,
        screenshot=shot if shot and shot.exists() else None, webgl_missing=bool(result.get("webgl_missing")),
    )


def _chromium(binary: str, tmp: str, args: list[str], timeout: float) -> str:
    profile = tempfile.mkdtemp(prefix="profile-", dir=tmp)
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"chromium exited with {done.returncode}: {tail[0]}")
    return done.stdout


# --------------------------------------------------------------------------- continual learning (issue 12)


def _continual_section(data: ReportData) -> Section:
    section = Section("continual", "Continual learning: the forgetting matrix", intro=(
        "Runs over <code>data.domains</code> score every domain's validation split after every stage. "
        "The heatmap is the best trial's stage &times; domain matrix of mean cosine to the teacher, each cell beside "
        "that domain's PCA ceiling; <em>forgetting</em> is the mean drop of earlier domains from their best."))
    trial = _continual_trial(data)
    if trial is None:
        section.items.append(Note("No complete trial holds a forgetting matrix."))
        return section
    section.items.append(continual_heatmap(trial.metrics, f"trial {trial.number}"))
    m = trial.metrics
    if "cl_naive/forgetting" in m:  # continual.baselines: naive, joint and single-domain runs inside the trial
        section.items.append(Note(
            f"Baselines trained in trial {trial.number}: naive sequential forgetting {m['cl_naive/forgetting']:.4f} "
            f"(this trial {m.get('forgetting', float('nan')):.4f}, cut {m.get('cl_forgetting_cut', float('nan')):.0%}), "
            f"avg final {m['cl_naive/avg_final_cosine']:.4f}; joint avg final {m['cl_joint/avg_final_cosine']:.4f} "
            f"(this trial {m.get('avg_final_cosine', float('nan')):.4f}); plasticity "
            f"{m.get('cl_plasticity', float('nan')):.3f} of single-domain runs."))
    tuned = [p.key for p in data.params]
    points = [t for t in data.complete if "forgetting" in t.metrics]
    if tuned and len(points) >= 2:
        section.items.append(forgetting_figure(points, tuned))
    else:
        section.items.append(Note("Forgetting against a tuned parameter needs a tuned parameter and two complete "
                                  "trials over data.domains."))
    return section


def _continual_trial(data: ReportData):
    """The best trial if it holds a matrix, else the complete trial with the highest avg_final_cosine."""
    if data.best is not None and any(k.startswith("cl_matrix/") for k in data.best.metrics):
        return next((t for t in data.complete if t.number == data.best.number), None)
    scored = [t for t in data.complete if "avg_final_cosine" in t.metrics]
    return max(scored, key=lambda t: t.metrics["avg_final_cosine"]) if scored else None


def continual_heatmap(metrics: dict[str, float], title: str) -> go.Figure:
    """Stage x domain heatmap of ``cl_matrix/<stage>/<domain>``, cells annotated with the PCA ceiling."""
    stages: list[str] = []
    domains: list[str] = []
    for key in metrics:
        if key.startswith("cl_matrix/"):
            _, stage, domain = key.split("/", 2)
            stages += [stage] if stage not in stages else []
            domains += [domain] if domain not in domains else []
    z = [[metrics.get(f"cl_matrix/{s}/{d}") for d in domains] for s in stages]
    text = [[f"{v:.3f}<br>pca {metrics.get(f'cl_pca/{d}', float('nan')):.3f}" if v is not None else ""
             for v, d in zip(row, domains)] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=domains, y=[f"after stage {s}" for s in stages], text=text,
                               texttemplate="%{text}", colorscale="Viridis", colorbar={"title": "cosine"},
                               hovertemplate="%{y}, %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Validation cosine per domain after each stage ({title}); "
                            f"forgetting {metrics.get('forgetting', float('nan')):.4f}, "
                            f"avg final {metrics.get('avg_final_cosine', float('nan')):.4f}",
                      yaxis={"autorange": "reversed"}, height=160 + 60 * len(stages), margin={"t": 60})
    return fig


def forgetting_figure(trials: list, params: list[str]) -> go.Figure:
    """Forgetting and average final cosine of every complete trial against each tuned parameter."""
    fig = make_subplots(rows=2, cols=len(params), shared_xaxes="columns", horizontal_spacing=0.08,
                        row_titles=["forgetting", "avg_final_cosine"], subplot_titles=params)
    for col, key in enumerate(params, start=1):
        pts = sorted((t for t in trials if key in t.params), key=lambda t: str(t.params[key]))
        for row, metric in ((1, "forgetting"), (2, "avg_final_cosine")):
            fig.add_trace(go.Scatter(
                x=[t.params[key] for t in pts], y=[t.metrics.get(metric) for t in pts], mode="markers",
                marker={"color": SERIES_COLORS[row - 1]}, name=metric, showlegend=col == 1,
                text=[f"trial {t.number}" for t in pts], hovertemplate="%{text}: %{x} -> %{y:.4f}<extra></extra>"),
                row=row, col=col)
    fig.update_layout(title="Forgetting against the tuned parameters", height=520)
    return fig


# --------------------------------------------------------------------------- transfer between sizes (issue 11)


def _setting(data: ReportData, trial, key: str) -> Any:
    """A trial's value of ``key``: sampled, else fixed by the study's ``set``, else the preset's."""
    if key in trial.params:
        return trial.params[key]
    if key in data.fixed:
        return data.fixed[key]
    from cnn3d.config import flatten, preset

    try:
        return flatten(preset(data.preset or "test"))[key]
    except Exception:  # noqa: BLE001 - an unknown preset in an old study: no value
        return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _transferred(init_from: Any) -> bool:
    return str(init_from or "").strip().lower() not in ("", "none")


def _transfer_section(data: ReportData) -> Section:
    section = Section("transfer", "Transfer between sizes: from scratch against train.init_from", intro=(
        "One panel per <code>lattice.size</code>: every trial's validation cosine per epoch as a fraction of its "
        "own PCA ceiling (the best linear code through the same face, on the same split), trials started from "
        "<code>train.init_from</code> against trials trained from scratch. Epoch 1 is after one epoch of training "
        "(docs/transfer.md)."))
    fig = transfer_curves_figure(data)
    section.items.append(fig if fig is not None else Note("No trial reported an epoch with val_cosine."))
    return section


def transfer_curves_figure(data: ReportData) -> go.Figure | None:
    """Per lattice size: val_cosine / baseline_pca_cosine against epoch, from-scratch and transferred trials."""
    lines = []  # (size, transferred, trial, epochs, fractions)
    for t in data.trials:
        points = [(int(h.get("epoch", i + 1)), h["val_cosine"] / h["baseline_pca_cosine"])
                  for i, h in enumerate(t.history) if _number(h.get("val_cosine"))
                  and _number(h.get("baseline_pca_cosine")) and h["baseline_pca_cosine"] > 0]
        if points:
            lines.append((_setting(data, t, "lattice.size"), _transferred(_setting(data, t, "train.init_from")), t,
                          [e for e, _ in points], [v for _, v in points]))
    if not lines:
        return None
    sizes = sorted({line[0] for line in lines}, key=lambda v: (not isinstance(v, (int, float)), v))
    fig = make_subplots(rows=1, cols=len(sizes), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"lattice.size={s}" for s in sizes])
    seen: set[str] = set()
    for size, moved, t, xs, ys in lines:
        name = "from train.init_from" if moved else "from scratch"
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=name, legendgroup=name, showlegend=_first(name, seen),
            line={"color": SERIES_COLORS[1] if moved else SERIES_COLORS[7], "dash": "solid" if t.state == "COMPLETE"
                  else "dash"},
            hovertemplate=f"trial {t.number} ({name}, {t.state.lower()})<br>epoch %{{x}}: %{{y:.3f}} of pca<extra></extra>",
        ), row=1, col=sizes.index(size) + 1)
    fig.update_layout(title="Quality against epochs per lattice size: transferred vs from scratch",
                      height=420, template="plotly_white", hovermode="closest")
    fig.update_yaxes(title_text="val_cosine / PCA ceiling", row=1, col=1)
    fig.update_xaxes(title_text="epoch", dtick=1)
    return fig
