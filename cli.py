"""The ``fedrad`` command: what Flower's own CLI does not do."""

from __future__ import annotations

import typer

from fedrad.client.cli import site_app
from fedrad.server.cli import certs_app, run_status
from fedrad.simulations.cli import demo, simulate
from fedrad.simulations.inference_cli import evaluate, export, predict

app = typer.Typer(
    name="fedrad",
    help="fedrad: federated radiology across hospital sites, on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("demo")(demo)
app.command("simulate")(simulate)
app.command("predict")(predict)
app.command("evaluate")(evaluate)
app.command("export")(export)
app.add_typer(site_app, name="site")
app.add_typer(certs_app, name="certs")
app.command("status")(run_status)


@app.command("models")
def models() -> None:
    """List the models in fedrad's registry."""
    from fedrad.common.models import list_models  # imports torch: only for this command

    for name in list_models():
        typer.echo(name)


def main() -> None:
    """Entry point of the ``fedrad`` console script."""
    app()
