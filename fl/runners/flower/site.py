"""A SuperNode's own data: the CSV its operator names (``privagg flower supernode --data PATH --name SITE``).

The node's own ``--node-config`` holds ``data-path`` and ``site-name``; nothing in a job can point a node at
other data, and a node with its own data never loads the bundled set. At the start of a run (the hello)
each such node reports its site name and its CSV's column names, read from the header only (no row
leaves the node); the ServerApp refuses the run before any round if the sites' columns differ, naming
for each site the columns it lacks and the ones it has in excess (:func:`check_sites`), or if two nodes
claim the same site name.

The privagg ClientApp trains on these tables (the functions after ``check_sites``): the node reads only its
own file, with the job's target/drop/missing rules; the statistics are one round over the nodes through
the run's secure sum; the server holds no training row, only the sites' n_k (public metadata, as in
memory), and evaluates on its own ``--test-data`` or not at all.
"""

from __future__ import annotations

import json
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


# ---- training on the nodes' own tables (the privagg ClientApp) ------------------------------------------
# A train job on nodes with their own data runs in three steps, each on public facts only: the hello
# reports every node's schema, row count n_k and label values (:func:`own_hello`); a statistics round
# (round 0) sums the nodes' statistics vectors through the run's secure sum with the DP noise each node
# adds itself (:func:`stats_request`, :func:`stats_contribution`, :func:`release_from_total`); every
# training start then carries the one release with the sizes and classes (:func:`own_start_fields`),
# from which a node builds its client side on its own rows (:func:`own_client_side`).

OWN_KEY = "own"
"""The start-message field that carries the release, the sites' n_k and the classes (JSON)."""
STATS_KEY = "stats_round"
"""The start-message field that asks for a node's statistics contribution (round 0, JSON)."""


@dataclass(frozen=True)
class OwnTable:
    """One node's own rows, cleaned by the job's missing-value rule, and its schema (from its own file)."""

    name: str
    frame: Any
    schema: Any

    @property
    def classes(self) -> list[str]:
        return sorted({str(v) for v in self.frame[self.schema.target].unique()})


def own_table(node_config: Mapping[str, Any], config: Any) -> OwnTable | None:
    """This node's table: ONLY the file its own node config names, read with the job's target/drop/missing rules.

    ``None`` for a node without its own data. Nothing in the job (``config``) names a path.
    """
    from fl.data.sites import _read_csv, build_schema, clean_missing

    site = node_site(node_config)
    if site is None:
        return None
    who = f"site {site.name!r}"
    frame = _read_csv(site.path, who)
    if len(frame) == 0:
        raise ValueError(f"{who} ({site.path}) has no rows; give the node a CSV with data")
    schema = build_schema({site.name: frame}, target=config.target, drop=config.drop_columns,
                          keep=config.keep_columns)
    return OwnTable(site.name, clean_missing(frame, schema, config.missing, who=who), schema)


def own_hello(table: OwnTable, config: Any, population: int) -> dict[str, Any]:
    """What a node reports of its table for a train job: public metadata only (as in memory).

    Its schema (numeric and categorical column names), its row count n_k and its label values; without
    DP (and undeclared), the category values it holds, which the in-memory run reveals as candidates too.
    """
    from fl.data.sites import _stats_privacy
    from fl.data.stats import _as_text

    declared = {c for c, _ in config.categories}
    dp = _stats_privacy(config, population) is not None
    values = {} if dp or config.standardize == "public" else {
        c: sorted(_as_text(table.frame[[c]])[c].unique().tolist()) for c in table.schema.categorical
        if c not in declared}
    return {"rows": len(table.frame), "classes": table.classes, "numeric": list(table.schema.numeric),
            "categorical": list(table.schema.categorical), "values": json.dumps(values)}


@dataclass(frozen=True)
class OwnSites:
    """The sites of an own-data run, by client id: names, schema, n_k, classes, candidate values."""

    names: dict[int, str]
    schema: Any
    sizes: list[int]
    classes: list[str]
    values: dict[str, list[str]]


def own_sites(hellos: Mapping[int, Mapping[str, Any]], config: Any) -> OwnSites:
    """Merge the hellos (``{client id: fields}``) of an own-data train run; refuse schemas that differ."""
    from fl.data.stats import Schema

    cids = sorted(hellos)
    if cids != list(range(len(cids))):
        raise SiteMismatchError(f"the sites' client ids are {cids}, not 0..{len(cids) - 1}")
    kinds = {str(hellos[c]["site"]): (tuple(hellos[c]["numeric"]), tuple(hellos[c]["categorical"])) for c in cids}
    if len(set(kinds.values())) > 1:
        text = "; ".join(f"site {n!r}: numeric {list(k[0])}, text {list(k[1])}" for n, k in sorted(kinds.items()))
        raise SiteMismatchError(f"the sites' column kinds differ ({text}); fix those CSVs or --drop the column")
    numeric, categorical = next(iter(kinds.values()))
    values: dict[str, set[str]] = {}
    for c in cids:
        for col, vals in json.loads(str(hellos[c].get("values", "{}"))).items():
            values.setdefault(str(col), set()).update(str(v) for v in vals)
    return OwnSites(names={c: str(hellos[c]["site"]) for c in cids},
                    schema=Schema(target=str(config.target), numeric=numeric, categorical=categorical),
                    sizes=[int(hellos[c]["rows"]) for c in cids],
                    classes=sorted({str(v) for c in cids for v in hellos[c]["classes"]}),
                    values={c: sorted(v) for c, v in values.items()})


def _stats_parts(config: Any, population: int) -> tuple[Any, Any]:
    """The statistics sum (the run's, over every site) and its DP, as the in-memory run derives them."""
    from fl.data.sites import _stats_privacy, _stats_sum

    return _stats_sum(config, population), _stats_privacy(config, population)


def server_test_frame(config: Any, schema: Any) -> Any:
    """The server's own evaluation rows (``--test-data``), cleaned like the sites'; ``None`` without one."""
    from fl.data.sites import DataError, _read_csv, clean_missing

    if not config.test_site:
        return None
    path = config.test_site.partition("=")[2] if "=" in config.test_site else config.test_site
    frame = _read_csv(Path(path), "--test-data")
    lacking = [c for c in (schema.target, *schema.numeric, *schema.categorical) if c not in frame.columns]
    if lacking:
        raise DataError(f"the server's test data {path} lacks column(s) {lacking} the sites have")
    return clean_missing(frame, schema, config.missing, who="the test set")


def stats_request(config: Any, own: OwnSites, test: Any) -> tuple[Any, dict[str, Any]]:
    """The server's plan of the statistics round and the start fields that ask every node for its vector."""
    from fl.data.stats import _candidates, plan_statistics

    ssum, privacy = _stats_parts(config, len(own.sizes))
    declared = {c: list(v) for c, v in config.categories}
    cand = _candidates([], own.schema, declared, privacy is not None)  # DP: undeclared categories are refused
    cand.update({c: tuple(own.values.get(c, ())) for c in own.schema.categorical if c not in declared})
    plan = plan_statistics(own.schema, rows=own.sizes, secure_sum=ssum, privacy=privacy,
                           bounds={c: (lo, hi) for c, lo, hi in config.feature_bounds}, reference=test,
                           candidates=cand)
    request = {"rows": list(plan.rows), "centre": [float(v) for v in plan.centre],
               "width": [float(v) for v in plan.width], "candidates": {c: list(v) for c, v in cand.items()}}
    return plan, {STATS_KEY: json.dumps(request)}


def stats_contribution(table: OwnTable, config: Any, cid: int, population: int, raw: Any) -> tuple[Any, Any, Any]:
    """A node's statistics contribution: ``(secure sum, ring spec, encoded vector)`` from its own rows.

    The noise it adds, the clipping and the sum come from the job's config as this node reads it (the
    server sends only the public ranges, the candidates and the sites' n_k, which it cannot use to
    weaken the noise: the clip box bounds the sensitivity whatever the ranges).
    """
    import numpy as np

    from dp.rng import SecureRandom
    from fl.data.stats import encode_contribution, plan_statistics, stats_pipeline

    req = json.loads(str(raw))
    rows = [int(n) for n in req["rows"]]
    if len(rows) != population or rows[cid] != len(table.frame):
        raise ValueError(f"the statistics request names {len(rows)} sites and {rows[cid:cid + 1]} rows for this "
                         f"one; this node has {len(table.frame)} rows in a run of {population} sites")
    centre, width = np.asarray(req["centre"], dtype=np.float64), np.asarray(req["width"], dtype=np.float64)
    if centre.shape != (len(table.schema.numeric),) or width.shape != centre.shape \
            or not (np.all(np.isfinite(centre)) and np.all(np.isfinite(width)) and np.all(width > 0)):
        raise ValueError("the statistics request's public ranges are malformed (one finite centre and "
                         "positive width per numeric column)")
    ssum, privacy = _stats_parts(config, population)
    cand = {c: tuple(str(v) for v in req["candidates"][c]) for c in table.schema.categorical}
    plan = plan_statistics(table.schema, rows=rows, secure_sum=ssum, privacy=privacy, bounds=None, reference=None,
                           candidates=cand, ranges=(centre, width))
    pipe = stats_pipeline(ssum, size=plan.size, cohort=population, bound=plan.bound)
    seeded = config.insecure_seeded_randomness
    rng = SecureRandom.for_testing(f"{config.seed}:stats:{cid}") if seeded else SecureRandom()
    return ssum, pipe.sum_spec, encode_contribution(pipe, plan.vector(table.frame), plan.share, rng)


def release_from_total(plan: Any, config: Any, total: Any, included: Any, test: Any) -> Any:
    """The one statistics release from the round-0 secure sum (every site must be in it, as in memory)."""
    from dp.rng import SecureRandom
    from fl.data.stats import stats_info, stats_pipeline

    cids = list(range(len(plan.rows)))
    if sorted(included) != cids:
        raise RuntimeError(f"the statistics round left out sites {sorted(set(cids) - set(included))}; every site "
                           "must contribute before training starts: restart the run")
    ssum, privacy = _stats_parts(config, len(cids))
    pipe = stats_pipeline(ssum, size=plan.size, cohort=len(cids), bound=plan.bound)
    rng = SecureRandom.for_testing(f"{config.seed}:stats:-1") if config.insecure_seeded_randomness else SecureRandom()
    decoded = pipe.decode(total, stats_info(cids), rng)
    return plan.release(decoded, secure_sum=ssum, privacy=privacy, reference=test, declared=bool(config.categories))


def run_classes(own: OwnSites, test: Any) -> list[str]:
    """The run's label values: those the sites report and the server's test rows hold (sorted, as in memory)."""
    extra = set() if test is None else {str(v) for v in test[own.schema.target].unique()}
    classes = sorted(set(own.classes) | extra)
    if len(classes) < 2:
        raise ValueError(f"target column {own.schema.target!r} has a single class at every site; a classifier "
                         "needs at least two")
    return classes


def server_dataset(own: OwnSites, stats: Any, test: Any, classes: list[str]) -> Any:
    """The server's view of an own-data run: no training row, n_k per site, its own test rows (or none)."""
    import numpy as np

    from fl.data.sites import Dataset

    width = len(stats.feature_names)
    index = {c: i for i, c in enumerate(classes)}
    x_test = np.zeros((0, width), dtype=np.float32) if test is None else stats.transform(test)
    y_test = np.zeros(0, dtype=np.int64) if test is None else \
        np.array(test[own.schema.target].astype(str).map(index), dtype=np.int64)
    return Dataset(name="own sites", x_train=np.zeros((0, width), dtype=np.float32), y_train=np.zeros(0, np.int64),
                   x_test=x_test, y_test=y_test, feature_names=stats.feature_names, classes=tuple(classes),
                   parts=tuple(np.arange(n, dtype=np.int64) for n in own.sizes),
                   site_names=tuple(own.names[c] for c in sorted(own.names)), guarantees=(stats.guarantee,),
                   stats=stats)


def own_start_fields(stats: Any, own: OwnSites, classes: list[str]) -> dict[str, Any]:
    """What every training start carries to an own-data node: the release, every site's n_k, the classes."""
    return {OWN_KEY: json.dumps({"stats": stats.to_json(), "sizes": own.sizes, "classes": classes}, sort_keys=True)}


def own_client_side(table: OwnTable, config: Any, cid: int, raw: Any, *, calibrate: Any) -> Any:
    """This node's :class:`~fl.training.client.ClientSide` on its own rows, from a start's :data:`OWN_KEY` field."""
    from fl.data.stats import FederatedStats
    from fl.training.client import ClientSide

    data = json.loads(str(raw))
    stats = FederatedStats.from_json(data["stats"])
    if stats.schema != table.schema:
        raise ValueError(f"the run's preprocessing release was made on other columns ({stats.schema}) than this "
                         f"site's ({table.schema})")
    return ClientSide.for_own_data(config, cid, table.frame, stats=stats, sizes=[int(n) for n in data["sizes"]],
                                   classes=[str(c) for c in data["classes"]], name=table.name, calibrate=calibrate)
