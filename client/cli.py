"""``fedrad site ...``: what hospital IT runs at a site."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedrad.common.config import load_settings, parse_overrides
from fedrad.common.errors import FedradError

from .prepare import DEFAULT_MODALITIES, check_site, prepare_site
from .readiness import (
    build_readiness,
    readiness_text,
    write_readiness,
    write_shareable_summary,
)

console = Console()
site_app = typer.Typer(help="Prepare and check a hospital site's data.", no_args_is_help=True)

_MODALITY_HELP = ("Accepted modality (repeatable; '*' accepts all). Default: "
                  + ", ".join(DEFAULT_MODALITIES) + ".")

DicomDir = Annotated[Path, typer.Option("--dicom-dir", help="Folder of DICOM files.")]
Labels = Annotated[Path, typer.Option("--labels", help="CSV with columns file,label.")]
SiteId = Annotated[str, typer.Option("--site-id", help="This site's name.")]
Workers = Annotated[int, typer.Option("--workers", min=1, help="Parallel processes.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Run setting key=value, e.g. --set image-size=64 (repeatable).")]
AllowModality = Annotated[list[str] | None, typer.Option("--allow-modality",
                                                         help=_MODALITY_HELP)]
MinSize = Annotated[int, typer.Option("--min-size", min=1,
                                      help="Smallest accepted rows / columns.")]
MaxSize = Annotated[int, typer.Option("--max-size", min=1,
                                      help="Largest accepted rows / columns.")]
AllowBurnedIn = Annotated[bool, typer.Option(
    "--allow-burned-in", help="Accept images marked BurnedInAnnotation = YES.")]
Subgroups = Annotated[bool, typer.Option(
    "--subgroup-fields", help="Keep sex and a 10-year age band per image (subgroup metrics).")]
FileTimeout = Annotated[float, typer.Option(
    "--file-timeout", min=1.0, help="Seconds one file may take (enforced with --workers > 1).")]
SecretFile = Annotated[Path | None, typer.Option(
    "--secret-file", help="File holding the site secret (default: site-secret in the cache "
    "folder, created if absent).")]


def _run_with_progress(label: str, call: Callable[[Callable[[int, int], None]], Any]) -> Any:
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task(label, total=None, rate="")

        def on_progress(done: int, total: int) -> None:
            elapsed = progress.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:.0f} files/s" if elapsed > 0 else ""
            progress.update(task, completed=done, total=total, rate=rate)

        return call(on_progress)


def _fail(err: FedradError) -> typer.Exit:
    from rich.markup import escape  # "[reason-code]" is not markup

    console.print(f"[red]error:[/red] {escape(str(err))}")
    if err.local_detail:
        console.print(f"  detail (local only): {err.local_detail}")
    return typer.Exit(code=2)


def _secret(secret_file: Path | None) -> str | None:
    if secret_file is None:
        return None
    try:
        return secret_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        console.print(f"[red]error:[/red] the secret file cannot be read: {e}")
        raise typer.Exit(code=2) from e


@site_app.command("prepare")
def prepare(
    dicom_dir: DicomDir,
    labels: Labels,
    out: Annotated[Path, typer.Option("--out", help="Cache folder to write (stays here).")],
    site_id: SiteId = "site",
    workers: Workers = 1,
    set_: SetOpt = None,
    allow_modality: AllowModality = None,
    min_size: MinSize = 16,
    max_size: MaxSize = 16384,
    allow_burned_in: AllowBurnedIn = False,
    subgroup_fields: Subgroups = False,
    file_timeout: FileTimeout = 120.0,
    secret_file: SecretFile = None,
) -> None:
    """Validate, de-identify, decode and preprocess a site's DICOM into its local cache."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_settings(parse_overrides(set_))
        result = _run_with_progress("preparing", lambda on_progress: prepare_site(
            dicom_dir, labels, out, settings, site_id=site_id, workers=workers,
            progress=on_progress, allowed_modalities=allow_modality or DEFAULT_MODALITIES,
            min_size=min_size, max_size=max_size, allow_burned_in=allow_burned_in,
            subgroup_fields=subgroup_fields, file_timeout=file_timeout,
            site_secret=_secret(secret_file)))
    except FedradError as err:
        if err.code == "no-usable-image" and (out / "quarantine.jsonl").is_file():
            _write_readiness(out)
        raise _fail(err) from None
    console.print(f"{result.accepted} images cached in {result.cache_dir}, "
                  f"{result.rejected} quarantined ({result.seconds:.1f} s)")
    for code, count in sorted(result.reasons.items()):
        console.print(f"  {code}: {count}")
    _write_readiness(result.cache_dir)


def _write_readiness(cache_dir: Path) -> None:
    """Write the readiness report and the shareable summary next to the cache."""
    report = build_readiness(cache_dir)
    paths = write_readiness(report, cache_dir)
    summary = write_shareable_summary(report, cache_dir)
    console.print(readiness_text(report))
    console.print(f"readiness report: {paths[1]} (summary to share with the coordinator: "
                  f"{summary})")


@site_app.command("check")
def check(
    dicom_dir: DicomDir,
    labels: Labels,
    out_report: Annotated[Path | None, typer.Option(
        "--out-report", help="Folder for check-report.json (site-local).")] = None,
    site_id: SiteId = "site",
    workers: Workers = 1,
    set_: SetOpt = None,
    allow_modality: AllowModality = None,
    min_size: MinSize = 16,
    max_size: MaxSize = 16384,
    allow_burned_in: AllowBurnedIn = False,
    subgroup_fields: Subgroups = False,
    file_timeout: FileTimeout = 120.0,
    secret_file: SecretFile = None,
) -> None:
    """Validate a site's DICOM like 'prepare' does, as a dry run: no pixels are written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_settings(parse_overrides(set_))
        result = _run_with_progress("checking", lambda on_progress: check_site(
            dicom_dir, labels, settings, site_id=site_id, workers=workers,
            progress=on_progress, out_report=out_report,
            allowed_modalities=allow_modality or DEFAULT_MODALITIES, min_size=min_size,
            max_size=max_size, allow_burned_in=allow_burned_in,
            subgroup_fields=subgroup_fields, file_timeout=file_timeout,
            site_secret=_secret(secret_file)))
    except FedradError as err:
        raise _fail(err) from None
    console.print(f"{result.accepted} images usable, {result.rejected} would be quarantined "
                  f"({result.seconds:.1f} s)")
    for code, count in sorted(result.reasons.items()):
        console.print(f"  {code}: {count}")
    if result.report is not None:
        console.print(f"report: {result.report}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@site_app.command("egress")
def egress(
    log_file: Annotated[Path, typer.Argument(
        help="The site's egress log (egress-log=... in the node config; default "
             "<data-dir>/egress.jsonl).")],
    full: Annotated[bool, typer.Option(
        "--full", help="Show full SHA-256 digests and every record on its own line.")] = False,
) -> None:
    """Show every message this site has sent: when, which run and round, how many bytes,
    its SHA-256 and what it contained (in words, never values)."""
    from rich.table import Table

    from .egress import read_egress_log

    try:
        entries = list(read_egress_log(log_file))
    except FedradError as err:
        raise _fail(err) from None
    table = Table(title=f"Messages sent by this site ({len(entries)})", show_lines=full)
    for column in ("time (UTC)", "run", "round", "type", "bytes", "sha256", "contents"):
        table.add_column(column, overflow="fold")
    total = 0
    for e in entries:
        total += e.bytes
        digest = e.sha256 or e.message_id or "-"
        if e.kind == "error":
            contents = f"[red]error sent to the server:[/red] {e.error}"
        else:
            contents = "\n".join(
                f"{r['name']} ({r['kind']}, {_size(int(r['bytes']))}"
                + (f", sha256 {r['sha256']}" if full else "") + f"): {r['contents']}"
                for r in e.records)
        table.add_row(e.time.replace("T", " ")[:23], str(e.run_id),
                      "-" if e.server_round is None else str(e.server_round),
                      e.message_type, _size(e.bytes), digest if full else digest[:16],
                      contents)
    console.print(table)
    console.print(f"{len(entries)} messages, {_size(total)} in all")


ApprovedFile = Annotated[Path, typer.Option(
    "--approved", help="The site's list of approved app bundles (JSON).")]


@site_app.command("approve")
def approve_app(
    bundle: Annotated[str | None, typer.Argument(
        help="The app bundle (.fab file from 'flwr build') or its SHA-256.")] = None,
    approved: ApprovedFile = Path("approved-apps.json"),
    note: Annotated[str, typer.Option("--note", help="Why / by whom it was approved.")] = "",
    revoke_hash: Annotated[str | None, typer.Option(
        "--revoke", help="Remove this SHA-256 from the approved bundles instead.")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Only list the approved bundles.")]
    = False,
) -> None:
    """Approve an app bundle: 'fedrad site run' runs only bundles approved here."""
    from .approval import approve, load_approved, revoke

    try:
        if revoke_hash is not None:
            gone = revoke(approved, revoke_hash)
            console.print(f"revoked sha256 {gone.sha256}")
        elif bundle is not None:
            entry = approve(approved, bundle, note=note)
            what = f"{entry.fab_id} {entry.version}".strip() or "bundle"
            console.print(f"approved {what} sha256 {entry.sha256}")
        elif not list_only:
            console.print("[red]error:[/red] name a .fab file or a SHA-256 to approve, or use "
                          "--revoke <sha256> or --list")
            raise typer.Exit(code=2)
        apps = load_approved(approved)
    except FedradError as err:
        raise _fail(err) from None
    console.print(f"{len(apps)} approved bundle(s) in {approved}")
    for app in apps.values():
        console.print(f"  {app.sha256}  {app.fab_id} {app.version}  {app.approved_at}  "
                      f"{app.note}")


@site_app.command("run", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})
def run_site_cmd(
    ctx: typer.Context,
    approved: ApprovedFile = Path("approved-apps.json"),
    runtime_port: Annotated[int, typer.Option(
        "--runtime-port", min=1, max=65535,
        help="Local (127.0.0.1) port of the SuperNode's Runtime API.")] = 9094,
    launcher: Annotated[str | None, typer.Option(
        "--launcher", help="warm (default): one pre-imported process forks each task; "
                           "cold: a fresh ClientApp process per task.")] = None,
    supernode_poll: Annotated[float | None, typer.Option(
        "--supernode-poll", min=0.05, max=3.0,
        help="Seconds an idle SuperNode waits before asking the SuperLink for work again "
             "(Flower's default: 3).")] = None,
) -> None:
    """Run this site's SuperNode so that it runs only approved app bundles.

    Every other argument goes to flower-supernode, e.g. fedrad site run --approved
    approved-apps.json --superlink link.example.org:9092 --root-certificates ca.crt
    --auth-supernode-private-key site.key --node-config 'data-dir="/data/cache" site-id="a"'
    """
    from .approval import run_site

    logging.basicConfig(level=logging.INFO, format="fedrad site run %(levelname)s %(message)s")
    try:
        code = run_site(list(ctx.args), approved, runtime_port=runtime_port,
                        launcher=launcher, supernode_poll=supernode_poll)
    except FedradError as err:
        raise _fail(err) from None
    raise typer.Exit(code=code)


@site_app.command("privacy")
def privacy(
    ledger: Annotated[Path, typer.Argument(
        help="The site's privacy ledger (privacy-ledger.json) or the cache folder holding it.")],
    budget: Annotated[float | None, typer.Option(
        "--budget", help="The site's privacy-budget, to show what is left.")] = None,
) -> None:
    """Show the epsilon this site has spent on differentially private rounds."""
    from .privacy import LEDGER_FILE, ledger_text

    try:
        console.print(ledger_text(ledger / LEDGER_FILE if ledger.is_dir() else ledger,
                                  budget=budget), highlight=False, markup=False)
    except FedradError as err:
        raise _fail(err) from None
