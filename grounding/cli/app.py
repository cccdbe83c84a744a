"""The ``grounding`` command line. Each command's help is its documentation; each command
is a module of grounding.cli, registered here in the order ``grounding --help`` lists."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from grounding._version import __version__
from grounding.cli import review
from grounding.cli.ask import ask
from grounding.cli.common import EXIT_STATUS
from grounding.cli.corrections import import_corrections_cmd
from grounding.cli.detect import detect
from grounding.cli.doctor import doctor
from grounding.cli.evaluate import evaluate_cmd
from grounding.cli.export import export
from grounding.cli.label import label
from grounding.cli.masks import masks
from grounding.cli.merge import merge
from grounding.cli.parse import parse


class _FlagHelp:
    """--help is a switch: typer's rich help would show it as ``--help <bool>``."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Command(_FlagHelp, TyperCommand):
    pass


class Group(_FlagHelp, TyperGroup):
    pass


app = typer.Typer(
    name="grounding",
    cls=Group,
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
                                          metavar="", help="Print the version and exit.")
                       ] = False,
) -> None:
    """Turn vision-language models into object detectors and auto-labelers."""


app.command(cls=Command)(parse)
app.command(cls=Command, epilog=EXIT_STATUS)(detect)
app.command(cls=Command)(ask)
app.command(cls=Command, epilog=EXIT_STATUS)(label)
app.command(cls=Command)(export)
app.command(cls=Command, name="eval")(evaluate_cmd)
app.command(cls=Command)(merge)
app.command(cls=Command)(masks)
app.command(cls=Command)(doctor)


class ReviewGroup(_FlagHelp, review.DefaultGroup):
    pass


review_app = typer.Typer(cls=ReviewGroup, no_args_is_help=True, add_completion=False,
                         help="Send the labels most worth a look to Label Studio (or CVAT) "
                              "and bring the corrections back: grounding review RUN_DIR "
                              "--out DIR, then review push, review pull.")
review_app.command(cls=Command, name="select")(review.select)
review_app.command(cls=Command)(review.push)
review_app.command(cls=Command)(review.pull)
app.add_typer(review_app, name="review")
app.command(cls=Command, name="import-corrections")(import_corrections_cmd)
