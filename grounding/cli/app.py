"""The ``grounding`` command line. Each command's help is its documentation; each command
is a module of grounding.cli, registered here in the order ``grounding --help`` lists."""

from __future__ import annotations

from typing import Annotated

import typer

from grounding._version import __version__
from grounding.cli.ask import ask
from grounding.cli.detect import detect
from grounding.cli.doctor import doctor
from grounding.cli.evaluate import evaluate_cmd
from grounding.cli.export import export
from grounding.cli.label import label
from grounding.cli.parse import parse

app = typer.Typer(
    name="grounding",
    help="Turn vision-language models into object detectors and auto-labelers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grounding {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Turn vision-language models into object detectors and auto-labelers."""


app.command()(parse)
app.command()(detect)
app.command()(ask)
app.command()(label)
app.command()(export)
app.command(name="eval")(evaluate_cmd)
app.command()(doctor)
