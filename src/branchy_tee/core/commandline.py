"""argparse with the project's error convention: one line on stderr, exit code 2.
Standard library only (the enclave entry point uses it too)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from branchy_tee.core.errors import UsageError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text or default is None or default is False:
            return text
        if default == [] or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` of ``--listen``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen expects HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"--listen: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise UsageError(f"--listen: port {p} is out of range")
    return host, p
