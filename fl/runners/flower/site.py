"""A SuperNode's own data: the CSV its operator names (``privagg flower supernode --data PATH --name SITE``).

The node's own ``--node-config`` holds ``data-path`` and ``site-name``; nothing in a job can point a node at
other data, and a node with its own data never loads the bundled set. At the start of a run (the hello)
each such node reports its site name and its CSV's column names, read from the header only (no row
leaves the node); the ServerApp refuses the run before any round if the sites' columns differ, naming
for each site the columns it lacks and the ones it has in excess (:func:`check_sites`), or if two nodes
claim the same site name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DATA_PATH_KEY", "SITE_NAME_KEY", "Site", "SiteMismatchError", "check_sites", "hello_fields",
           "node_site", "read_header"]

DATA_PATH_KEY = "data-path"
"""The SuperNode ``--node-config`` key naming this site's CSV."""
SITE_NAME_KEY = "site-name"
"""The SuperNode ``--node-config`` key naming this site (e.g. ``hospital-a``)."""


class SiteMismatchError(RuntimeError):
    """The sites of a run do not hold the same columns (or two nodes claim one site name)."""


@dataclass(frozen=True)
class Site:
    """One node's data: its name, its CSV and the CSV's columns (header only)."""

    name: str
    path: Path
    columns: tuple[str, ...]


def read_header(path: Path) -> tuple[str, ...]:
    """The column names of the CSV at ``path`` (its header row); a ``ValueError`` naming the fix otherwise."""
    import csv

    try:
        with Path(path).open(newline="") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read the site's CSV {path}: {exc}; pass --data a readable CSV file") from exc
    cols = tuple(c.strip() for c in header or ())
    if not cols or not all(cols):
        raise ValueError(f"{path} has no header row of column names; the first line must name every column")
    dup = sorted(c for c, k in Counter(cols).items() if k > 1)
    if dup:
        raise ValueError(f"{path} names column(s) {dup} more than once; give every column its own name")
    return cols


def node_site(node_config: Mapping[str, Any]) -> Site | None:
    """This node's site from its own node config; ``None`` for a node without its own data."""
    path = node_config.get(DATA_PATH_KEY)
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        raise ValueError(f"--node-config {DATA_PATH_KEY} must be a file path string, got {path!r}")
    name = node_config.get(SITE_NAME_KEY) or Path(path).stem
    if not isinstance(name, str):
        raise ValueError(f"--node-config {SITE_NAME_KEY} must be a string, got {name!r}")
    return Site(name=name, path=Path(path), columns=read_header(Path(path)))


def hello_fields(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a node tells the server at the start of a run about its data: site name and column names."""
    site = node_site(node_config)
    return {} if site is None else {"site": site.name, "columns": list(site.columns)}


def _reference(columns: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The column set most sites share (ties: the first site by name)."""
    counts = Counter(frozenset(c) for c in columns.values())
    best = max(counts.values())
    for name in sorted(columns):
        if counts[frozenset(columns[name])] == best:
            return columns[name]
    raise AssertionError("no sites")  # pragma: no cover


def check_sites(hellos: Mapping[int, Mapping[str, Any]]) -> dict[int, str]:
    """Check the hellos (``{node id: reply fields}``) of a run; ``{node id: site name}`` of the nodes with data.

    Raises :class:`SiteMismatchError` when some nodes have their own data and others do not, when two
    nodes claim one site name, or when the sites' columns differ (naming, per site, the columns missing
    and the extra ones against the columns most sites share).
    """
    sites = {n: h for n, h in hellos.items() if "site" in h}
    if not sites:
        return {}
    bare = sorted(set(hellos) - set(sites))
    if bare:
        raise SiteMismatchError(f"SuperNode(s) {bare} have no own data while others do; start every node with "
                                "`privagg flower supernode --data CSV --name SITE`")
    names = {n: str(h["site"]) for n, h in sites.items()}
    dup = sorted(s for s, k in Counter(names.values()).items() if k > 1)
    if dup:
        raise SiteMismatchError(f"two SuperNodes claim site name(s) {dup}; give every site its own --name")
    columns = {names[n]: tuple(str(c) for c in h.get("columns", [])) for n, h in sites.items()}
    ref = _reference(columns)
    diffs = []
    for name in sorted(columns):
        missing = [c for c in ref if c not in columns[name]]
        extra = [c for c in columns[name] if c not in ref]
        if missing or extra:
            diffs.append(f"site {name!r} lacks {missing} and has extra {extra}")
    if diffs:
        raise SiteMismatchError("the sites' columns differ: " + "; ".join(diffs) + f" (the other sites have "
                                f"{list(ref)}). Give every site the same columns before starting the run")
    return names
