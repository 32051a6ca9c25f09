"""The manifest template rendered the way gramine-manifest renders it, without Gramine: for builds
on a machine without it (for inspection) and for the digest of the measured settings that
simulated evidence carries (``config.settings_digest``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jinja2

from branchy_tee.gramine.tools import MANIFEST_TEMPLATE

TEMPLATES = Path(__file__).resolve().parent / "templates"
# gramine.runtimedir() of Gramine's Debian/Ubuntu packages: used only when gramine-manifest is absent.
DEBIAN_GRAMINE_RUNTIME = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"


def jinja_environment() -> jinja2.Environment:
    """Like gramine-manifest's: StrictUndefined, so a missing value is an error, not an empty string."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


@functools.lru_cache(maxsize=4)
def _template(runtimedir: str) -> jinja2.Template:
    env = jinja_environment()
    env.globals["gramine"] = {"runtimedir": lambda libc="glibc": runtimedir}
    return env.get_template(MANIFEST_TEMPLATE)


def render_manifest(
    defines: dict[str, str], runtimedir: str = DEBIAN_GRAMINE_RUNTIME, template: str | os.PathLike[str] | None = None
) -> str:
    """Render the manifest template as gramine-manifest would, ``gramine.runtimedir()`` being
    ``runtimedir``. Raises ``jinja2.UndefinedError`` when a value is missing."""
    if template is None:
        return _template(runtimedir).render(**defines)
    env = jinja_environment()
    env.globals["gramine"] = {"runtimedir": lambda libc="glibc": runtimedir}
    return env.from_string(Path(template).read_text()).render(**defines)
