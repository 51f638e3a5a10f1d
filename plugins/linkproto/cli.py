"""Command-line helpers shared by the ``link`` and ``relay`` commands."""

from __future__ import annotations

import argparse

__all__ = ["accept_common_options"]


def accept_common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``--config``/``--state-dir`` also follow a nested sub-command
    (``authgw link enroll URL --config DIR``). The core reads them from anywhere in the command
    line to build the plugins; here they only need accepting, without overwriting the values
    given earlier (hence ``SUPPRESS``)."""
    parser.add_argument("--config", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser
