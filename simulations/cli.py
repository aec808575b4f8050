"""``fedrad demo``: the command-line face of the one-machine demo."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedrad.common.config import parse_overrides
from fedrad.common.errors import FedradError

console = Console()


def demo(
    data_path: Annotated[Path | None, typer.Option(
        "--data-path", help="A MedMNIST-format 2-D .npz (e.g. pneumoniamnist.npz). Without "
        "it, a synthetic federation of chest phantoms is generated.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for sites, caches and results.")]
    = Path("fedrad-demo"),
    sites: Annotated[int, typer.Option("--sites", min=1, help="Number of hospital sites.")] = 3,
    alpha: Annotated[float, typer.Option(
        "--alpha", help="Dirichlet label-skew alpha for .npz data (smaller: more non-IID).")]
    = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Federated rounds.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model from `fedrad models`.")]
    = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Processes for writing and preparing the sites.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any run setting as key=value, e.g. --set local-epochs=2 "
        "(repeatable).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's logs.")]
    = False,
) -> None:
    """Run a federated study on this machine, from DICOM sites to pooled metrics."""
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    # Round tables are printed by this command; fedrad's own log shows warnings only.
    fedrad_log = logging.getLogger("fedrad")
    if not fedrad_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fedrad_log.addHandler(handler)
    fedrad_log.setLevel(logging.INFO if verbose else logging.WARNING)
    from .demo import DemoOptions, run_demo  # imports torch: only when the demo runs

    try:
        overrides = parse_overrides(set_)
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        if model is not None:
            overrides["model"] = model
        opts = DemoOptions(out_dir=out, data_path=data_path, num_sites=sites, alpha=alpha,
                           seed=seed, overrides=overrides)
        if workers is not None:
            opts.workers = workers

        def on_round(report) -> None:
            console.rule(f"round {report.server_round}/{report.num_rounds}")
            for failure in report.failures:
                console.print(f"[yellow]{failure}[/yellow]")
            console.print(report.table, highlight=False)

        with console.status("working...", spinner="dots") as status:
            def say(text: str) -> None:
                console.print(text, highlight=False)
                status.update(text.strip()[:70])

            result = run_demo(opts, say=say, on_round=on_round)
    except FedradError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    console.rule(f"final metrics after {result.settings.num_server_rounds} rounds "
                 f"({result.seconds:.0f} s in all)")
    console.print(result.final.table, highlight=False)
    console.print(f"Outputs: {result.run_dir} (metrics.json, metrics.csv, checkpoints/, "
                  "model-latest.pt)")


def simulate(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see simulations/*.yaml).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for sites, caches and results.")]
    = Path("fedrad-experiment"),
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a run setting of the file, e.g. --set num-server-rounds=3 "
        "(repeatable).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's logs.")]
    = False,
) -> None:
    """Compare federated strategies with pooled and local-only training on one machine."""
    from .experiment import load_experiment, run_experiment

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("fedrad").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        cfg = load_experiment(config, overrides=parse_overrides(set_))
        with console.status("working...", spinner="dots") as status:
            def say(text: str) -> None:
                console.print(text, highlight=False)
                status.update(text.strip()[:70])

            result = run_experiment(cfg, out, say=say)
    except FedradError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    console.rule(f"{cfg.name}: central test set ({result.seconds:.0f} s in all)")
    console.print(f"{'':<22}{'AUC':>8}{'95% CI':>16}{'ACC':>8}{'SENS':>8}{'SPEC':>8}{'F1':>8}")
    for row in result.rows:
        ci = (f"[{row['auc-ci-low']:.3f}, {row['auc-ci-high']:.3f}]"
              if "auc-ci-low" in row else "")
        cells = "".join(f"{row[k]:>8.4f}" if row[k] is not None else f"{'-':>8}"
                        for k in ("accuracy", "sensitivity", "specificity", "f1"))
        name = row["name"] + (f" [fold {row['fold']}]" if "fold" in row else "")
        console.print(f"{name:<22}{row['auc']:>8.4f}{ci:>16}{cells}", highlight=False)
    report = ", report.html" if (result.out_dir / "report.html").is_file() else ""
    console.print(f"Outputs: {result.out_dir} (results.json, results.csv, comparison.png"
                  f"{report})")
