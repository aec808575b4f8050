"""``fedrad certs ...``: the coordinator's certificate and site-key tooling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedrad.common.errors import FedradError

from . import certs

console = Console()
certs_app = typer.Typer(help="Create the study's CA, the SuperLink certificate and site keys.",
                        no_args_is_help=True)

StudyDir = Annotated[Path, typer.Option("--study", help="The study's folder.")]


def _fail(err: FedradError) -> None:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    raise typer.Exit(code=2)


@certs_app.command("init")
def init(
    study: StudyDir,
    server_name: Annotated[list[str] | None, typer.Option(
        "--server-name", help="Hostname sites use to reach the SuperLink (repeatable).")] = None,
    server_ip: Annotated[list[str] | None, typer.Option(
        "--server-ip", help="IP address sites use to reach the SuperLink (repeatable).")] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Server certificate validity.")]
    = 397,
) -> None:
    """Create a study: a CA and the SuperLink's TLS certificate."""
    try:
        paths = certs.init_study(study, server_names=server_name or [],
                                 server_ips=server_ip or [], days=days)
    except FedradError as err:
        _fail(err)
    console.print(f"CA: {paths.ca_cert} (give to every site)\n"
                  f"SuperLink: {paths.server_cert}, {paths.server_key}\n"
                  f"Keep {paths.ca_key} offline.")


@certs_app.command("add-site")
def add_site(
    study: StudyDir,
    site_id: Annotated[str, typer.Option("--site-id", help="The new site's name.")],
) -> None:
    """Create one site's SuperNode key; the other sites keep theirs."""
    try:
        key = certs.add_site(study, site_id)
    except FedradError as err:
        _fail(err)
    console.print(f"{site_id}: private key {key.private_key} (send to the site only), "
                  f"public key {key.public_key}\nRegister it with: flwr supernode register "
                  f"{key.public_key} <connection>")


@certs_app.command("revoke")
def revoke(
    study: StudyDir,
    site_id: Annotated[str, typer.Option("--site-id", help="The site to revoke.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the registry).")] = "",
) -> None:
    """Revoke a site's key (then unregister it from the SuperLink)."""
    try:
        public = certs.revoke_site(study, site_id, reason=reason)
    except FedradError as err:
        _fail(err)
    console.print(f"{site_id} revoked. Remove it from the SuperLink with: "
                  f"flwr supernode unregister <node-id> <connection> (key: {public})")


@certs_app.command("renew")
def renew(study: StudyDir,
          days: Annotated[int, typer.Option("--days", min=1)] = 397) -> None:
    """Issue a fresh SuperLink certificate from the study's CA."""
    try:
        path = certs.renew_server_certificate(study, days=days)
    except FedradError as err:
        _fail(err)
    console.print(f"renewed {path}, valid until {certs.certificate_expiry(path):%Y-%m-%d}")


@certs_app.command("status")
def status(study: StudyDir) -> None:
    """Show expiry dates and the study's sites."""
    try:
        sites = certs.list_sites(study)
    except FedradError as err:
        _fail(err)
    paths = certs.StudyPaths(study)
    for label, path in (("CA", paths.ca_cert), ("SuperLink", paths.server_cert)):
        console.print(f"{label}: valid until {certs.certificate_expiry(path):%Y-%m-%d}")
    for site in sites:
        state = "revoked" if site["revoked"] else "active"
        console.print(f"  {site['site-id']}: {state}, key sha256 {site['fingerprint'][:16]}")


def run_status(
    out_dir: Annotated[Path, typer.Option(
        "--out-dir", help="The run's output folder (out-dir; holds status.json).")],
    connection: Annotated[str | None, typer.Option(
        "--connection", help="Also ask the SuperLink through this flwr connection (e.g. "
        "study-local) which sites are online and which runs exist.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
    = False,
) -> None:
    """Show the coordinator's view: the round in progress, replies, last pooled metrics."""
    from .status import fetch_nodes, fetch_runs, format_status, read_status

    try:
        current = read_status(out_dir)
        nodes = fetch_nodes(connection) if connection else []
        runs = fetch_runs(connection) if connection else []
    except FedradError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps({"status": current, "nodes": nodes, "runs": runs}, indent=2))
    else:
        console.print(format_status(current, nodes=nodes, runs=runs), highlight=False,
                      markup=False)
