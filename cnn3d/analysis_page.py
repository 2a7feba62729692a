"""Draw a ``cnn3d.analyze.Analysis`` as one self-contained HTML page (plotly.js embedded once, no network)."""

from __future__ import annotations

import html
import math
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .analysis import DIRECTION, EMERGENCE_NAMES, SHUFFLES, verdict

CUBE_STYLE = {"trained": ("#1f77b4", "solid"), "untrained": ("#8c564b", "dash")}
REF_STYLE = {"teacher": ("#2ca02c", "dash"), "chance": ("#7f7f7f", "dot"), "shuffled labels": ("#d62728", "dot")}
CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#555;font-size:14px}
h2{margin-top:36px;border-bottom:1px solid #ddd}"""
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def render(a) -> str:
    """The page for ``a`` (a ``cnn3d.analyze.Analysis``)."""
    from plotly.offline import get_plotlyjs

    parts = [
        f"<h1>cnn3d analysis of <code>{_e(a.checkpoint)}</code></h1>",
        f"<p class=\"note\">Lattice {_e(a.config.get('lattice.size'))} (depth {_e(a.config.get('lattice.depth') or a.config.get('lattice.size'))}), "
        f"{_e(a.config.get('lattice.steps'))} steps, corpus {_e(a.config.get('data.corpus'))}; "
        f"analysis took {a.seconds:.0f} s. Every figure shows the trained cube beside the untrained cube "
        "(same seed, initial weights) and, where one exists, a shuffled control or chance level.</p>",
        "<h2>Emergence beside its nulls</h2>", emergence_table(a.emergence), _fig(emergence_figure(a), "emergence"),
        "<h2>Information flow along depth</h2>",
        "<p class=\"note\">Per depth layer z (z=0 is the front face's layer): effective dimension of the states, "
        "validation cosine of a ridge probe (fitted on training sentences) recovering the teacher embedding, and RSA "
        "with the teacher.</p>", _fig(layer_figure(a), "layers"),
        "<h2>The back layer, step by step</h2>", _fig(steps_figure(a), "steps"),
        "<h2>Light cone of a one-cell perturbation</h2>",
        "<p class=\"note\">One front-face cell of one input is nudged; the fraction of cells whose state moves "
        "(beyond 1e-6) after each step, beside a front that spreads exactly one cell per step.</p>",
        _fig(light_cone_figure(a), "light-cone"),
        "<h2>Probing tasks</h2>",
        f"<p class=\"note\">Logistic probes (fitted on 70% of the probing set, scored on 30%) from {_e('; '.join(a.probing_source))}. "
        "The teacher is the ceiling; chance predicts the most frequent class; the shuffled-label control fits the "
        "teacher embedding with permuted labels.</p>", _fig(probe_figure(a), "probes"),
        "<h2>Similarity matrices</h2>", _fig(rsm_figure(a), "rsm"),
        "<h2>Decoding against bank size</h2>",
        "<p class=\"note\">Decode top-1 of the validation sentences as distractors join the bank, beside the same "
        "decoding of the PCA reconstruction through the face's numbers (the linear ceiling) and of the train-mean "
        "vector for every sentence (the floor).</p>",
        _fig(decoding_figure(a), "decoding"),
        edits_note(a),
    ]
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>cnn3d analysis</title>\n"
            f"<style>{CSS}</style>\n<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fig(fig: go.Figure, div_id: str) -> str:
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOTLY_CONFIG,
                       default_height=f"{fig.layout.height or 420}px")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def emergence_table(m: dict[str, float]) -> str:
    """HTML table of every emergence metric: raw, both nulls, excess ± bootstrap std and a verdict."""
    rows = []
    for name in EMERGENCE_NAMES:
        if name not in m:
            continue
        ex, sd = m.get(f"{name}_excess", float("nan")), m.get(f"{name}_excess_std", float("nan"))
        reading = verdict(name, m)
        direction = "higher" if DIRECTION[name] > 0 else "lower"
        cells = [name, _fmt(m[name]), _fmt(m.get(f"{name}_null_untrained")), _fmt(m.get(f"{name}_null_shuffled")),
                 f"{ex:+.4g} ± {sd:.2g}", reading, f"{direction} = more structure; shuffle: {SHUFFLES[name]}"]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("metric", "trained", "untrained cube", "shuffled control",
                                              "excess ± bootstrap std", "verdict (|excess| > 2 std)", "note"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def emergence_figure(a) -> go.Figure:
    names = [n for n in EMERGENCE_NAMES if n in a.emergence]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[n.replace("_", " ") for n in names])
    for i, name in enumerate(names, 1):
        values = [a.emergence[name], a.emergence.get(f"{name}_null_untrained", 0.0),
                  a.emergence.get(f"{name}_null_shuffled", 0.0)]
        fig.add_trace(go.Bar(x=["trained", "untrained", "shuffled"], y=values, showlegend=False,
                             marker_color=["#1f77b4", "#8c564b", "#7f7f7f"]), row=1, col=i)
    fig.update_layout(height=340, template="plotly_white", margin={"t": 60, "b": 40})
    return fig


def _cube_lines(fig, xs, per_cube: dict[str, list[float]], row: int, col: int, seen: set) -> None:
    for cube, ys in per_cube.items():
        color, dash = CUBE_STYLE.get(cube, ("#555", "solid"))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{cube} cube", legendgroup=cube,
                                 showlegend=cube not in seen, line={"color": color, "dash": dash}), row=row, col=col)
        seen.add(cube)


def layer_figure(a) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=["effective dimension", "ridge probe cosine to teacher",
                                                        "RSA with teacher"])
    seen: set = set()
    for col, values in enumerate((a.effective_dim, a.ridge_cosine, a.rsa), 1):
        _cube_lines(fig, a.layers, {c: [v[layer] for layer in a.layers] for c, v in values.items()}, 1, col, seen)
    fig.update_layout(height=400, template="plotly_white")
    return fig


def steps_figure(a) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=["back layer: effective dimension", "back layer: ridge probe cosine"])
    seen: set = set()
    for col, key in enumerate(("effective_dim", "ridge_cosine"), 1):
        per = {c: v[key] for c, v in a.steps.items()}
        xs = list(range(1, len(next(iter(per.values()))) + 1))
        _cube_lines(fig, xs, per, 1, col, seen)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_layout(height=360, template="plotly_white")
    return fig


def light_cone_figure(a) -> go.Figure:
    fig = go.Figure()
    for cube, cone in a.light_cone.items():
        color, dash = CUBE_STYLE.get(cube, ("#555", "solid"))
        fig.add_trace(go.Scatter(x=cone["step"], y=cone["changed"], mode="lines+markers", name=f"{cube} cube",
                                 line={"color": color, "dash": dash}))
    first = next(iter(a.light_cone.values()))
    fig.add_trace(go.Scatter(x=first["step"], y=first["one_cell_per_step"], mode="lines", name="one cell per step",
                             line={"color": "#2ca02c", "dash": "dot"}))
    fig.update_layout(height=360, template="plotly_white", xaxis_title="step", yaxis_title="fraction of cells changed")
    return fig


def probe_figure(a) -> go.Figure:
    tasks = list(a.probes)
    cols = min(2, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=tasks or ["no probing task"])
    seen: set = set()
    for i, task in enumerate(tasks):
        row, col = i // cols + 1, i % cols + 1
        entry = a.probes[task]
        layers = list(entry["trained"])
        _cube_lines(fig, layers, {c: [entry[c][layer] for layer in layers] for c in ("trained", "untrained")},
                    row, col, seen)
        for ref, key in (("teacher", "teacher"), ("chance", "chance"), ("shuffled labels", "shuffled_labels")):
            color, dash = REF_STYLE[ref]
            fig.add_trace(go.Scatter(x=[layers[0], layers[-1]], y=[entry[key]] * 2, mode="lines", name=ref,
                                     legendgroup=ref, showlegend=ref not in seen,
                                     line={"color": color, "dash": dash}), row=row, col=col)
            seen.add(ref)
    fig.update_layout(height=330 * rows + 60, template="plotly_white")
    fig.update_yaxes(title_text="held-out accuracy")
    return fig


def rsm_figure(a) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=["teacher", "student (trained cube)"], horizontal_spacing=0.08)
    labels = [t[:40] for t in a.rsm["texts"]]
    for col, key in enumerate(("teacher", "student"), 1):
        fig.add_trace(go.Heatmap(z=a.rsm[key], x=list(range(len(labels))), y=list(range(len(labels))),
                                 zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, showscale=col == 2,
                                 customdata=[[f"{labels[i]} | {labels[j]}" for j in range(len(labels))]
                                             for i in range(len(labels))],
                                 hovertemplate="%{customdata}<br>cosine %{z:.3f}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_layout(height=520, template="plotly_white")
    return fig


def edits_note(a) -> str:
    """The near-neighbour decoding in one line (analyses saved before it was added have none)."""
    d = getattr(a, "decoding_edits", None) or {}
    if not d:
        return ""
    return (f"<p class=\"note\">Near neighbours: a bank of the {int(d['bank_size'] - d['edits'])} validation sentences "
            f"and {int(d['edits'])} one-word edits of them. Decode top-1: student <b>{d['student']:.3f}</b>, PCA "
            f"through the face {d['pca']:.3f} (ceiling), train mean {d['mean']:.4f} (floor).</p>")


def decoding_figure(a) -> go.Figure:
    d = a.decoding
    fig = go.Figure([
        go.Scatter(x=d["bank_size"], y=d["student"], mode="lines+markers", name="student", line={"color": "#1f77b4"}),
        go.Scatter(x=d["bank_size"], y=d["pca"], mode="lines+markers", name="PCA through the face",
                   line={"color": "#2ca02c", "dash": "dash"}),
    ])
    if d.get("mean"):  # analyses saved before the floor was added lack it
        fig.add_trace(go.Scatter(x=d["bank_size"], y=d["mean"], mode="lines+markers", name="mean vector (floor)",
                                 line={"color": "#7f7f7f", "dash": "dot"}))
    fig.update_layout(height=360, template="plotly_white", xaxis_title="bank size (sentences)",
                      yaxis_title="decode top-1", xaxis_type="log" if len(d["bank_size"]) > 1 else "linear")
    return fig
