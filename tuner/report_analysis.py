"""The best trial's ``cnn3d-analyze`` views in the study report, computed once per best trial.

Every complete trial attaches its final weights to its MLflow run (``checkpoint/``, a
``cnn3d-train --out`` folder without optimiser state). When the report is written, the best
trial's checkpoint is downloaded and analysed with ``cnn3d.analyze.analyze_checkpoint`` (probes,
information flow, light cone, similarity matrices, decoding against bank size, emergence beside its
nulls); the numbers (``analysis/analysis.json``) and the self-contained page
(``analysis/analysis.html``) are attached to the best trial's run. A later report of the same
study finds ``analysis.json`` there and only redraws it, so the heavy analysis runs once per best
trial, not once per report.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
ANALYSIS_JSON = "analysis/analysis.json"
ANALYSIS_PAGE = "analysis/analysis.html"
# lighter than cnn3d-analyze's defaults: the report pays for this once per study
PROBE_SENTENCES = 300
DISTRACTORS: tuple[int, ...] = (1000,)


def log_trial_checkpoint(client, run_id: str, model, config, epochs_done: int) -> None:
    """Attach ``model``'s final weights to the trial's run as a checkpoint folder (``checkpoint/``).

    A several-teacher student is saved with every teacher in its meta (``cnn3d-decode`` reads it per teacher).
    """
    from cnn3d.checkpoint import save_checkpoint
    from cnn3d.multiteacher import MultiTeacherStudent, save_multi, teacher_configs

    with tempfile.TemporaryDirectory(prefix="cnn3d-trial-") as tmp:
        folder = Path(tmp) / CHECKPOINT_ARTIFACT
        if isinstance(model, MultiTeacherStudent):
            save_multi(folder, model, teacher_configs(config), extra_meta={"epochs_done": epochs_done})
        else:
            save_checkpoint(folder, model, config, {"teacher_dim": model.teacher_dim, "epochs_done": epochs_done})
        client.log_artifacts(run_id, str(folder), CHECKPOINT_ARTIFACT)


def _has_artifact(client, run_id: str, path: str) -> bool:
    folder, _, _ = path.rpartition("/")
    return any(a.path == path for a in client.list_artifacts(run_id, folder or None))


def best_trial_analysis(client, run_id: str | None, number: int | None = None,
                        progress: bool | None = None) -> tuple[Any, str]:
    """``(Analysis, "")`` for the best trial's run, or ``(None, why not)``.

    Reuses ``analysis/analysis.json`` when the run has it; otherwise analyses ``checkpoint/`` and
    attaches the numbers and the page to the run. Never raises: a failure becomes the reason.
    """
    from cnn3d.analyze import Analysis

    from .tracking import download_artifact

    if client is None or not run_id:
        return None, "The best trial's analysis needs its MLflow run (no MLflow store was given to the report)."
    try:
        with tempfile.TemporaryDirectory(prefix="cnn3d-report-") as tmp:
            if _has_artifact(client, run_id, ANALYSIS_JSON):
                stored = json.loads(Path(download_artifact(client, run_id, ANALYSIS_JSON, tmp)).read_text())
                return Analysis(**stored), ""
            if not _has_artifact(client, run_id, f"{CHECKPOINT_ARTIFACT}/config.json"):
                return None, ("The best trial's run holds no checkpoint (trials attach one since the analysis views "
                              "were added), so its analysis views cannot be drawn.")
            return _analyse(client, run_id, number, Path(download_artifact(client, run_id, CHECKPOINT_ARTIFACT, tmp)),
                            Path(tmp), progress), ""
    except Exception as exc:  # noqa: BLE001 - the rest of the report must not be lost to one view
        logger.warning("could not analyse the best trial's checkpoint", exc_info=True)
        return None, f"The best trial's analysis failed: {type(exc).__name__}: {exc}".splitlines()[0]


def _analyse(client, run_id: str, number: int | None, folder: Path, tmp: Path, progress: bool | None):
    from cnn3d.analyze import analyze_checkpoint, write_page

    started = time.perf_counter()
    logger.info("analysing the best trial%s once for the report (probes, information flow, decoding); "
                "the result is kept in its MLflow run", f" {number}" if number is not None else "")
    analysis = analyze_checkpoint(folder, probe_sentences=PROBE_SENTENCES, distractors=DISTRACTORS,
                                  progress=sys.stderr.isatty() if progress is None else progress)
    out = tmp / "analysis"
    out.mkdir()
    (out / "analysis.json").write_text(analysis.to_json())
    write_page(analysis, out / "analysis.html")
    client.log_artifacts(run_id, str(out), "analysis")
    logger.info("best trial analysed in %.0f s", time.perf_counter() - started)
    return analysis


def analysis_figures(analysis) -> list[tuple[str, Any]]:
    """``(title, plotly Figure)`` for every view of ``cnn3d-analyze``'s page, in its order."""
    from cnn3d import analysis_page as P

    return [("Emergence beside its nulls", P.emergence_figure(analysis)),
            ("Information flow along depth (per layer z)", P.layer_figure(analysis)),
            ("The back layer, step by step", P.steps_figure(analysis)),
            ("Light cone of a one-cell perturbation", P.light_cone_figure(analysis)),
            ("Probing tasks (teacher = ceiling, chance, shuffled labels, untrained cube)", P.probe_figure(analysis)),
            ("Similarity matrices: teacher vs student", P.rsm_figure(analysis)),
            ("Decoding against bank size, beside PCA through the face", P.decoding_figure(analysis))]
