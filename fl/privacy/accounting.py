"""Privacy ledgers for a federated run: user-level DP-FedAvg and example-level DP-SGD.

Both implement :class:`fl.spec.PrivacyAccounting`: the loop asks :meth:`can_run` before a round (and
stops with the returned message if the round would overspend), then :meth:`record` after it, whose
dict goes into the round's report line; :meth:`report` is the report's ``privacy`` section.

**Accounting as data.** A ledger holds, per privacy unit and observer, the composition of the
mechanisms the layers and trainers reported (:class:`dp.accounting.GaussianStep`, each one
``dp_accounting`` DpEvent). The report's ``privacy.observers`` lists, for each observer, the composed
DpEvent as JSON (``dp.accounting.event_to_json``), the neighbour relation, the accountant and its PLD
discretization, and the epsilon: anyone can rebuild the event with dp-accounting and recompute epsilon.
:meth:`state` / :meth:`load_state` are the event lists, for checkpoints.

- :class:`DpFedAvgAccounting` (client level): the steps the noise layer reports each round
  (:meth:`fl.layers.noise.GaussianNoise.steps`) -- for the released model, amplified by the secret client
  sample; with distributed noise also for the server, unamplified in every round (the server knows the
  sample). The headline epsilon is the largest over observers.
- :class:`DpSgdAccounting` (example level): one accountant per client, charged with the DP-SGD steps the
  client reports in ``TrainResult.extra["dp_sgd"]`` (Poisson rate ``batch / local size``; the batches are
  drawn from the client's CSPRNG, so amplification holds against everyone). The run's epsilon is the
  worst client's.

Adaptive clipping (:class:`fl.layers.adaptive_clip.AdaptiveClip`, ``adaptive=``) needs no event of its
own: its noisy count rides in one extra coordinate of the vector the noise layer noises, whose
sensitivity ``sqrt(1 + c^2/4)`` is the ``clip`` given here, so the Gaussian step the layer reports is the
joint mechanism. The report and round lines add the two parts -- the update's noise multiplier and the
count's noise std, from the noise actually added -- from which anyone recomputes the same epsilon
(Andrew et al. 2021, section 3: ``z^-2 = z_update^-2 + (2 sigma_b)^-2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from dp.accounting import PLD_FAST, Accountant, AccountantName, GaussianStep, event_to_json
from fl.layers.adaptive_clip import AdaptiveClip
from fl.layers.noise import RELEASED, SERVER, GaussianNoise
from fl.spec import Guarantee, RoundInfo, TrainResult, ValueSpec
from secagg.masking.graph import GraphSpec

__all__ = ["DpFedAvgAccounting", "DpSgdAccounting", "SurvivorFloor"]

_TOL = 1e-9


@dataclass(frozen=True, slots=True)
class SurvivorFloor:
    """The fewest survivors a round planned with ``n`` clients can be released with: the secure sum's rule.

    SecAgg(+) (``threshold`` set): every share group of ``k + 1`` clients (``k`` from ``graph``) keeps at
    least ``t`` members (``GraphSpec.parameters``, as the sum computes it), else the round aborts -- so at least ``t``
    survive. Other sums: ``min_clients`` (the plain sum and Paillier abort below it).
    """

    threshold: float | int | None = None
    graph: GraphSpec | None = None
    min_clients: int = 1

    def __call__(self, n: int) -> int:
        if n <= 0:
            return 0
        t = self.min_clients
        if self.threshold is not None or self.graph is not None:
            graph = self.graph if self.graph is not None else GraphSpec(complete=True)
            t = max(t, graph.parameters(n, self.threshold)[1])  # the (k, t) rule the sum itself uses
        return max(1, min(n, t))


def _observer_entry(acc: Accountant, delta: float, observer: str, unit: str) -> dict[str, Any]:
    used = acc.accountant_used
    return {
        "observer": observer,
        "unit": unit,
        "epsilon": acc.epsilon(delta),
        "delta": delta,
        "accountant_used": used,
        "neighboring_relation": acc.neighboring_relation,
        "pld_value_discretization_interval": acc.pld_interval if used.startswith("pld") else None,
        "steps": acc.total_steps,
        "event": event_to_json(acc.event()),
    }


_KNOWS = {
    RELEASED: "does not know the client sample (CSPRNG, never released): amplification by sampling applies",
    SERVER: "knows the client sample: no amplification; every released round is charged, as if the client "
    "took part in each",
}


class DpFedAvgAccounting:
    """Client-level ledger for DP-FedAvg: composes what the noise layer reports, per observer.

    ``noise``: the pipeline's :class:`~fl.layers.noise.GaussianNoise`; ``clip`` and ``size``: its input spec
    (clip norm and vector length, so discrete rounding is charged). ``floor``: the fewest survivors a
    round can be released with (distributed noise); :meth:`can_run` charges that worst case, so dropouts
    never overspend the budget. ``sum_hides_updates``: the sum reveals only the sum (SecAgg(+),
    Paillier); without it the server sees each update with one noise share.
    ``epsilon``: the budget (``None``: unlimited; epsilon is still reported).
    ``adaptive``: the pipeline's :class:`~fl.layers.adaptive_clip.AdaptiveClip`, if any (then ``clip``
    and ``size`` are its output spec's: the joint sensitivity and the update length plus one).
    """

    def __init__(
        self,
        *,
        noise: GaussianNoise,
        clip: float,
        size: int,
        delta: float,
        accountant: AccountantName = "pld",
        epsilon: float | None = None,
        floor: Callable[[int], int] | None = None,
        sum_hides_updates: bool = True,
        adaptive: AdaptiveClip | None = None,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise = noise
        self.adaptive = adaptive
        self.spec = ValueSpec(size=size, cohort=noise.shares or 1, l2_bound=clip)
        self.delta = delta
        self.budget = epsilon
        self.floor = floor if floor is not None else SurvivorFloor()
        self.sum_hides_updates = sum_hides_updates
        observers = (RELEASED, SERVER) if noise.placement == "clients" else (RELEASED,)
        self.accs = {o: Accountant(accountant=accountant, pld_interval=PLD_FAST) for o in observers}
        self.accountant: AccountantName = accountant
        self.rounds = 0

    @property
    def noise_multiplier(self) -> float:
        return self.noise.multiplier

    def _steps(self, info: RoundInfo) -> dict[str, GaussianStep]:
        return self.noise.steps(self.spec, info, sum_hides_updates=self.sum_hides_updates)

    def adaptive_split(self, info: RoundInfo | None = None) -> dict[str, float]:
        """Adaptive clipping: the noise actually on the sum, split into update and count parts.

        ``update_noise_multiplier``: noise std on the update in units of the round's clip norm;
        ``count_noise_std``: std of the noise on the count of unclipped clients. With distributed noise,
        for ``info``'s survivors (all shares when ``info`` is ``None``).
        """
        if self.adaptive is None:
            return {}
        sigma = self.noise.sigma(self.spec)
        if self.noise.placement == "clients" and info is not None:
            sigma *= math.sqrt(info.n_included / self.noise.n_shares(self.spec))
        update, count = self.adaptive.split(sigma)
        return {"update_noise_multiplier": update, "count_noise_std": count}

    def epsilons(self) -> dict[str, float]:
        """Epsilon spent so far, per observer."""
        return {o: acc.epsilon(self.delta) for o, acc in self.accs.items()}

    def spent(self) -> tuple[float, float]:
        return max(self.epsilons().values()), self.delta

    def worst_case(self, info: RoundInfo) -> RoundInfo:
        """``info`` with the fewest survivors the round can be released with (all planned, central noise)."""
        if self.noise.placement != "clients":
            return replace(info, included=info.planned)
        return replace(info, included=info.planned[: self.floor(len(info.planned))])

    def can_run(self, info: RoundInfo) -> tuple[bool, str]:
        if self.budget is None or not info.planned:
            return True, ""
        worst = self.worst_case(info)
        for observer, step in self._steps(worst).items():
            trial = self.accs[observer].copy()
            trial.compose(step)
            eps = trial.epsilon(self.delta)
            if eps > self.budget + _TOL:
                return False, (
                    f"round {info.round} would raise client-level epsilon (observer: {observer}) to {eps:.4f} > "
                    f"the budget {self.budget:g} (delta={self.delta:g}) if only {worst.n_included} of "
                    f"{len(info.planned)} clients survive; {self.rounds} rounds used epsilon "
                    f"{self.spent()[0]:.4f}. Raise --epsilon, lower --rounds, or add noise"
                )
        return True, ""

    def record(self, info: RoundInfo, trainer_results: Mapping[int, TrainResult]) -> dict[str, Any]:
        if info.n_included == 0:
            return {"epsilon": self.spent()[0], "delta": self.delta}
        steps = self._steps(info)
        for observer, step in steps.items():
            self.accs[observer].compose(step)
        self.rounds += 1
        eps = self.epsilons()
        return {
            "epsilon": max(eps.values()),
            "delta": self.delta,
            "epsilon_by_observer": eps,
            "noise_multiplier": steps[RELEASED].noise_multiplier,
            "sample_rate": steps[RELEASED].sample_rate,
            "sampling": steps[RELEASED].sampling,
            "steps": self.rounds,
            **self.adaptive_split(info),
        }

    def guarantees(self) -> tuple[Guarantee, ...]:
        """One claim per observer, derived from the composed events."""
        out = []
        for observer, acc in self.accs.items():
            eps = acc.epsilon(self.delta)
            out.append(
                Guarantee(
                    layer="dp-fedavg",
                    property=f"({eps:.4g}, {self.delta:g})-DP at client level over all rounds so far",
                    against=observer if observer == SERVER else f"anyone who sees the {observer} and the report",
                    assumptions=(
                        f"this observer {_KNOWS[observer]}",
                        f"neighbours: {acc.neighboring_relation.replace('_', '-')} client",
                        "public: participant counts per round, each client's n_k, the population size",
                    ),
                    params={"epsilon": eps, "delta": self.delta, "observer": observer,
                            "accountant": acc.accountant_used},
                )
            )
        return tuple(out)

    def state(self) -> dict[str, Any]:
        """The composed events per observer (JSON-ready), for checkpoints."""
        return {"rounds": self.rounds, "observers": {o: acc.state() for o, acc in self.accs.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        observers = dict(state["observers"])
        if set(observers) != set(self.accs):
            raise ValueError(f"checkpoint ledger covers observers {sorted(observers)}, this run {sorted(self.accs)}")
        for o, rows in observers.items():
            self.accs[o].load_state(rows)
        self.rounds = int(state["rounds"])

    def report(self) -> dict[str, Any]:
        eps = self.spent()[0]
        released = self.accs[RELEASED]
        steps = [{**s.as_dict(), "count": c} for s, c in sorted(released.steps.items())]
        distributed = self.noise.placement == "clients"
        return {
            "accountant": self.accountant,
            "accountant_used": released.accountant_used,
            "delta": self.delta,
            "epsilon": eps,
            "target_epsilon": self.budget,
            "unit": "client",
            "observers": [
                {**_observer_entry(acc, self.delta, o, "client"), "knows_schedule": o == SERVER,
                 "note": _KNOWS[o]}
                for o, acc in self.accs.items()
            ],
            "mechanisms": [
                {
                    "name": "dp-fedavg",
                    "level": "client",
                    "placement": "distributed" if distributed else "central",
                    "clip": self.spec.l2_bound,
                    "l2_sensitivity": self.noise.sensitivity(self.spec),
                    "discrete": self.noise.discrete,
                    "granularity": self.noise.grid(self.spec) if self.noise.discrete else None,
                    "noise_multiplier": self.noise.multiplier,
                    "steps": self.rounds,
                    "sample_rate": steps[0]["sample_rate"] if steps else None,
                    "sampling": steps[0]["sampling"] if steps else None,
                    "shares": self.noise.n_shares(self.spec) if distributed else None,
                    "min_included": self.floor(self.noise.n_shares(self.spec)) if distributed else None,
                    "composition": steps,
                    "epsilon": eps,
                    **self._adaptive_report(),
                }
            ],
        }

    def _adaptive_report(self) -> dict[str, Any]:
        if self.adaptive is None:
            return {}
        a = self.adaptive
        return {"adaptive_clip": {
            "target_quantile": a.target_quantile, "initial_clip": a.initial_clip, "learning_rate": a.learning_rate,
            "count_noise": a.count_noise, "count_scale": a.count_scale, "joint_sensitivity": a.sensitivity,
            **self.adaptive_split(),
            "note": "one Gaussian on (update / C_t, c (b - 1/2)): the joint noise multiplier z is what is charged; "
                    "z^-2 = update_noise_multiplier^-2 + (2 count_noise_std)^-2 (all shares present)",
        }}


class DpSgdAccounting:
    """Example-level ledger: one accountant per client, charged with its reported DP-SGD steps.

    ``planned``: ``cid -> (noise_multiplier, sample_rate, steps per round)`` used by :meth:`can_run` to
    predict the next round's cost before any client trains.
    """

    def __init__(
        self,
        *,
        delta: float,
        planned: Mapping[int, tuple[float, float, int]],
        accountant: AccountantName = "pld",
        epsilon: float | None = None,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.budget = epsilon
        self.accountant: AccountantName = accountant
        self.planned = dict(planned)
        self.clients: dict[int, Accountant] = {}
        self.steps: dict[int, int] = {}
        self.params: dict[int, tuple[float, float]] = {}

    def _acc(self, cid: int) -> Accountant:
        if cid not in self.clients:
            self.clients[cid] = Accountant(accountant=self.accountant, pld_interval=PLD_FAST)
            self.steps[cid] = 0
        return self.clients[cid]

    def epsilon(self, cid: int) -> float:
        return self._acc(cid).epsilon(self.delta)

    def spent(self) -> tuple[float, float]:
        return max((self.epsilon(c) for c in self.clients), default=0.0), self.delta

    def can_run(self, info: RoundInfo) -> tuple[bool, str]:
        if self.budget is None:
            return True, ""
        for cid in info.planned:
            if cid not in self.planned:
                continue
            z, q, n_steps = self.planned[cid]
            trial = self._acc(cid).copy()
            trial.compose(GaussianStep(z, q, "poisson"), n_steps)
            eps = trial.epsilon(self.delta)
            if eps > self.budget + _TOL:
                return False, (
                    f"round {info.round} would raise client {cid}'s example-level epsilon to {eps:.4f} > the "
                    f"budget {self.budget:g} (delta={self.delta:g}) after {self.steps.get(cid, 0)} DP-SGD steps. "
                    f"Raise --epsilon, lower --rounds, or raise --dpsgd-noise-multiplier"
                )
        return True, ""

    def record(self, info: RoundInfo, trainer_results: Mapping[int, TrainResult]) -> dict[str, Any]:
        per_client: dict[str, dict[str, Any]] = {}
        for cid, res in sorted(trainer_results.items()):
            stats = res.extra.get("dp_sgd")
            if stats is None:
                raise ValueError(
                    f"client {cid} reported no DP-SGD statistics; the DP-SGD ledger needs DpSgdTrainer results"
                )
            z, q, n = float(stats["noise_multiplier"]), float(stats["sample_rate"]), int(stats["steps"])
            self._acc(cid).compose(GaussianStep(z, q, "poisson"), n)
            self.steps[cid] += n
            self.params[cid] = (z, q)
            self.planned[cid] = (z, q, n)  # predict the next round from what the client actually did
            per_client[str(cid)] = {
                "noise_multiplier": z,
                "sample_rate": q,
                "steps": self.steps[cid],
                "epsilon": self.epsilon(cid),
            }
        eps, _ = self.spent()
        out: dict[str, Any] = {"epsilon": eps, "delta": self.delta}
        if self.clients:
            worst = max(self.clients, key=self.epsilon)
            z, q = self.params.get(worst, (math.nan, math.nan))
            out.update(
                {
                    "noise_multiplier": z,
                    "sample_rate": q,
                    "steps": self.steps[worst],
                    "worst_client": worst,
                    "dp_sgd_clients": per_client,
                }
            )
        return out

    def state(self) -> dict[str, Any]:
        """Each client's composed DP-SGD steps (JSON-ready), for checkpoints."""
        return {"clients": {str(c): acc.state() for c, acc in self.clients.items()},
                "params": {str(c): list(p) for c, p in self.params.items()},
                "planned": {str(c): list(p) for c, p in self.planned.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.clients, self.steps = {}, {}
        for c, rows in state["clients"].items():
            self._acc(int(c)).load_state(rows)
            self.steps[int(c)] = self.clients[int(c)].total_steps
        self.params = {int(c): (float(p[0]), float(p[1])) for c, p in state["params"].items()}
        self.planned = {int(c): (float(p[0]), float(p[1]), int(p[2])) for c, p in state["planned"].items()}

    def guarantees(self) -> tuple[Guarantee, ...]:
        """The example-level claim, for the ledger (DP-SGD is a trainer, not a pipeline layer)."""
        eps, _ = self.spent()
        return (
            Guarantee(
                layer="dp-sgd",
                property=(
                    f"({eps:.4g}, {self.delta:g})-DP at example level: each client's update, and so the model, "
                    "is differentially private with respect to any one training example of that client"
                ),
                against="the server and anyone who sees a client's update or the released model",
                assumptions=(
                    "per-example gradients clipped, Gaussian noise from a CSPRNG, Poisson-sampled batches drawn "
                    "from the client's CSPRNG (secret from the server, so amplification by sampling applies)",
                    "add/remove-one example neighbours; one record per example (not per person)",
                    "public: each client's sample count n_k (it sets the rate batch / n_k), its number of steps, "
                    "and whether it took part in a round; client-level membership is not hidden",
                    "floating-point Gaussian (Mironov 2012 caveat)",
                ),
                params={"epsilon": eps, "delta": self.delta, "accountant": self.accountant,
                        # the server sees each update; the released model is post-processing of those
                        "observer": ["server", "released model"]},
            ),
        )

    def report(self) -> dict[str, Any]:
        eps, _ = self.spent()
        clients = {
            str(cid): {
                "noise_multiplier": self.params.get(cid, (math.nan, math.nan))[0],
                "sample_rate": self.params.get(cid, (math.nan, math.nan))[1],
                "steps": self.steps[cid],
                "sampling": "poisson",
                "epsilon": self.epsilon(cid),
            }
            for cid in sorted(self.clients)
        }
        worst = [max(self.clients, key=self.epsilon)] if self.clients else []
        return {
            "accountant": self.accountant,
            "accountant_used": self.accountant,
            "delta": self.delta,
            "epsilon": eps,
            "target_epsilon": self.budget,
            "unit": "example",
            "observers": [
                {**_observer_entry(self.clients[c], self.delta, "server", "example"), "client": c,
                 "knows_schedule": False,
                 "note": "the server and anyone who sees this client's updates or the model; batches are "
                 "Poisson-sampled from the client's CSPRNG, so amplification applies (worst client shown)"}
                for c in worst
            ],
            "mechanisms": [
                {
                    "name": "dp-sgd",
                    "level": "example",
                    "clients": clients,
                    "epsilon": eps,
                }
            ],
        }
