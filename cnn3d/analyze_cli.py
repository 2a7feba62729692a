"""``cnn3d-analyze CHECKPOINT --out page.html``: a thin click wrapper over ``cnn3d.analyze``."""

from __future__ import annotations

import click

from .cli import LOG_LEVELS, run_cli, setup_logging, standalone


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML page to write.")
@click.option("--corpus", default=None, help="Analyse on this corpus instead of the checkpoint's data.corpus.")
@click.option("--probing-file", default=None, type=click.Path(dir_okay=False),
              help="Extra labelled probing set: .csv/.tsv/.jsonl with text and label columns.")
@click.option("--distractors", default="1000", show_default=True,
              help="Comma-separated distractor counts for decoding against bank size.")
@click.option("--edits", default=5, show_default=True, type=click.IntRange(min=0),
              help="One-word edits of each validation sentence in the near-neighbour decoding bank (0 skips it).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write every figure's numbers as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="warning")
@run_cli
def analyze_cli(checkpoint, out, corpus, probing_file, distractors, edits, json_out, progress, log_level) -> None:
    """Write one self-contained page analysing CHECKPOINT (a cnn3d-train --out folder) beside its nulls."""
    import sys

    from .analyze import analyze_checkpoint, check_output_path, write_page
    from .errors import UserError

    setup_logging(log_level)
    try:
        counts = tuple(int(x) for x in distractors.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--distractors {distractors!r} must be comma-separated whole numbers, e.g. 1000,10000") from None
    if any(c < 0 for c in counts):
        raise UserError(f"--distractors {distractors!r} must not be negative")
    check_output_path(out)
    analysis = analyze_checkpoint(checkpoint, corpus=corpus, probing_file=probing_file, distractors=counts,
                                  progress=sys.stderr.isatty() if progress is None else progress, edits=edits)
    path = write_page(analysis, out)
    if json_out:
        from pathlib import Path

        Path(json_out).write_text(analysis.to_json())
    click.echo(f"analysis page: {path} ({analysis.seconds:.0f} s)")


def analyze_main() -> None:
    """Entry point of ``cnn3d-analyze``."""
    standalone(analyze_cli)
