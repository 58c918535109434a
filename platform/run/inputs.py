"""The strings a user gives that fliqs puts somewhere: run names (paths, MLflow filters), the Ray address, the
tracking URI. Each has one documented form (SECURITY.md), checked before any work; torch-free.

Why a character set rather than escaping: a run name becomes a folder (``output_dir/<name>``), a Ray Train
storage name and the value of an MLflow search filter (``tags.`fliqs.run_name` = '<name>'``). One set that is safe
in all three (no quote, no slash, no leading dot) is simpler to trust than three escapers.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from fliqs.errors import BadInput

NAME_CHARS = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow's run ids

# The MLflow stores fliqs can open: the embedded SQLite file, a tracking server, a database server.
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def check_name(key: str, value: str | None) -> None:
    """BadInput unless ``value`` (a run, study or experiment name) is None or of `NAME_CHARS`."""
    if value is not None and not _NAME.match(str(value)):
        raise BadInput(f"{key}={value!r}: a name may hold {NAME_CHARS}")


def check_run_ref(value: str) -> None:
    """A run: an MLflow run id, or a run name, whose nested runs are ``<run>/<part>`` (a study's trial
    ``<study>/<trial>``, a candidate ``<study>/<trial>/candidate-0``): each part of `NAME_CHARS`."""
    if not (RUN_ID.match(value) or all(_NAME.match(part) for part in value.split("/"))):
        raise BadInput(f"run {value!r}: give an MLflow run id or a run name ({NAME_CHARS}; nested runs are "
                       f"<run>/<part>)")


def check_run_id(key: str, value: str | None) -> None:
    if value is not None and not RUN_ID.match(value):
        raise BadInput(f"{key}={value!r}: not an MLflow run id (32 hexadecimal digits)")


def check_tracking_uri(value: str | None) -> None:
    if value is None:
        return
    scheme = urlsplit(value).scheme.split("+")[0]  # postgresql+psycopg2://...
    if scheme not in TRACKING_SCHEMES:
        raise BadInput(f"tracking.uri={value!r}: unsupported scheme {scheme or '(none)'!r}; use sqlite:///PATH, "
                       f"http(s)://HOST:PORT (a tracking server) or a {'/'.join(TRACKING_SCHEMES[3:])} URI")
    if scheme == "sqlite" and not value.startswith("sqlite:///"):
        raise BadInput(f"tracking.uri={value!r}: a SQLite store is sqlite:///RELATIVE or sqlite:////ABSOLUTE/PATH")
    if scheme in ("http", "https") and not urlsplit(value).hostname:
        raise BadInput(f"tracking.uri={value!r}: no host")


def ray_host_port(value: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``HOST:PORT`` or ``ray://HOST:PORT``), None for ``auto`` / ``local``."""
    if value in ("auto", "local"):
        return None
    bare = value[len("ray://"):] if value.startswith("ray://") else value
    match = _HOST_PORT.match(bare)
    if not match or not 0 < int(match["port"]) < 65536:
        raise BadInput(f"ray_address={value!r}: give HOST:PORT (the head's GCS, default port 6379), "
                       f"ray://HOST:PORT (Ray Client, port 10001), 'auto' (this machine's cluster) or leave it "
                       f"unset (a local instance)")
    return match["host"].strip("[]"), int(match["port"])
