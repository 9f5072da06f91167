"""The ``sae`` command line: one click group; each family of commands lives in its own module."""

from __future__ import annotations

import click

from service import cli_client, cli_data, cli_demo, cli_formats, cli_models, cli_train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sae-service")
def main() -> None:
    """Train sparse and deep autoencoders on datasets larger than memory."""


for _module in (cli_demo, cli_data, cli_train, cli_models, cli_formats, cli_client):
    _module.register(main)
