"""``fedrad site ...``: what hospital IT runs at a site."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedrad.common.config import load_settings, parse_overrides
from fedrad.common.errors import FedradError

from .prepare import prepare_site

console = Console()
site_app = typer.Typer(help="Prepare and check a hospital site's data.", no_args_is_help=True)


@site_app.command("prepare")
def prepare(
    dicom_dir: Annotated[Path, typer.Option("--dicom-dir", help="Folder of DICOM files.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV with columns file,label.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder to write (stays here).")],
    site_id: Annotated[str, typer.Option("--site-id", help="This site's name.")] = "site",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel processes.")] = 1,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Run setting key=value, e.g. --set image-size=64 (repeatable).")]
    = None,
) -> None:
    """Decode, de-identify and preprocess a site's DICOM into its local training cache."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_settings(parse_overrides(set_))
        with Progress(TextColumn("preparing"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("prepare", total=None, rate="")

            def on_progress(done: int, total: int) -> None:
                elapsed = progress.tasks[task].elapsed or 0.0
                rate = f"{done / elapsed:.0f} files/s" if elapsed > 0 else ""
                progress.update(task, completed=done, total=total, rate=rate)

            result = prepare_site(dicom_dir, labels, out, settings, site_id=site_id,
                                  workers=workers, progress=on_progress)
    except FedradError as err:
        console.print(f"[red]error:[/red] {err}")
        if err.local_detail:
            console.print(f"  detail (local only): {err.local_detail}")
        raise typer.Exit(code=2) from None
    console.print(f"{result.accepted} images cached in {result.cache_dir}, "
                  f"{result.rejected} quarantined ({result.seconds:.1f} s)")
    for code, count in sorted(result.reasons.items()):
        console.print(f"  {code}: {count}")
