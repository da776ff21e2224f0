"""Running a PostgreSQL program (initdb, pg_ctl, postgres) and explaining why it failed.

Programs run with the environment of :mod:`.environment` and, as root, as the unprivileged user. A loader
error about a missing shared library (the binaries need ``libz.so.1``) becomes a message naming the system
package to install.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import EmbeddedUnavailable
from .backend import OWN_DB_HINT
from .environment import child_env

__all__ = ["PG_CTL_TIMEOUT", "CommandFailed", "missing_library_message", "run_program"]

log = logging.getLogger("oban_py.embedded")

PG_CTL_TIMEOUT = 60


class CommandFailed(Exception):
    """A PostgreSQL program exited with an error or timed out; ``output`` is what it printed."""

    def __init__(self, args: list[str], detail: str, output: str) -> None:
        self.command = Path(args[0]).name
        self.detail = detail
        self.output = output
        super().__init__(f"{self.command} {detail}")


_MISSING_LIB = re.compile(r"error while loading shared libraries: (\S+?):|Library not loaded: (\S+)")
_LIB_PACKAGES = {
    "libz.so.1": "zlib (Debian/Ubuntu: apt-get install zlib1g; Fedora/RHEL: dnf install zlib; "
    "Alpine: apk add zlib)",
}


def missing_library_message(output: str) -> str | None:
    """If ``output`` shows the dynamic loader failing, say which library to install."""
    match = _MISSING_LIB.search(output)
    if match is None:
        return None
    lib = match.group(1) or match.group(2)
    what = _LIB_PACKAGES.get(Path(lib).name, "the package that provides it")
    return (
        f"the embedded PostgreSQL binaries need the system library {lib}, which is missing: install {what}, "
        f"{OWN_DB_HINT}"
    )


def run_program(args: list[str], run_as: tuple[int, int] | None, timeout: float) -> str:
    """Run a PostgreSQL program with the safe environment, as ``run_as`` (uid, gid) when given.

    Output goes to temporary files, not pipes: ``pg_ctl start`` leaves the server holding inherited
    descriptors, and a pipe would never reach EOF.
    """
    kwargs: dict[str, Any] = {}
    if run_as is not None:
        kwargs = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        log.debug("running %s", " ".join(args))
        try:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd="/",
                timeout=timeout,
                check=False,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            out.seek(0)
            raise CommandFailed(args, f"timed out after {timeout:.0f}s", out.read()) from None
        except OSError as exc:
            raise EmbeddedUnavailable(
                f"cannot run {args[0]} ({exc}); reinstall it: pip install --force-reinstall "
                f"'oban-py[embedded]', {OWN_DB_HINT}"
            ) from exc
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise CommandFailed(args, f"exited with status {proc.returncode}", output)
    return output
