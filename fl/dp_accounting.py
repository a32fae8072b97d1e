"""Privacy ledgers for a federated run: user-level DP-FedAvg and example-level DP-SGD.

Both implement :class:`fl.spec.PrivacyAccounting`: the loop asks :meth:`can_run` before a round (and
stops with the returned message if the round would overspend), then :meth:`record` after it, whose
dict goes into the round's report line; :meth:`report` is the report's ``privacy`` section. Every figure
needed to recompute epsilon independently is in the report: the accountant, delta, and per mechanism the
noise multiplier, sampling rate and scheme, and the number of steps.

- :class:`DpFedAvgAccounting` (client level): one subsampled Gaussian event per round, Poisson at rate
  ``q`` or a fixed cohort without replacement (see :mod:`dp.accounting`). With distributed noise the
  event's multiplier is ``z * sqrt(included / shares)``: the ledger charges the noise that actually
  reached the sum.
- :class:`DpSgdAccounting` (example level): one accountant per client, charged with the DP-SGD steps the
  client reports in ``TrainResult.extra["dp_sgd"]`` (Poisson rate ``batch / local size``). The run's
  epsilon is the worst client's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dp.accounting import Accountant, AccountantName, GaussianStep
from fl.spec import Guarantee, RoundInfo, TrainResult

__all__ = ["DpFedAvgAccounting", "DpSgdAccounting"]

_TOL = 1e-9


def _step_for(info: RoundInfo, z: float) -> GaussianStep:
    q = min(1.0, info.sample_rate)
    if info.sampling == "poisson":
        return GaussianStep(z, q, "poisson")
    if q >= 1:
        return GaussianStep(z, 1.0, "fixed")
    return GaussianStep(z, q, "fixed", info.population, len(info.planned))


class DpFedAvgAccounting:
    """Client-level ledger for DP-FedAvg: noise ``multiplier * clip`` on the sum, once per round.

    ``placement="clients"``: distributed noise split over ``shares`` clients (survivors are charged).
    ``min_included``: the fewest survivors a released round can have (the secure sum's threshold);
    :meth:`can_run` charges that worst case, so dropouts down to it never overspend the budget.
    ``epsilon``: the budget (``None``: unlimited; epsilon is still reported).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        delta: float,
        clip: float,
        accountant: AccountantName = "pld",
        placement: str = "server",
        shares: int = 1,
        epsilon: float | None = None,
        sensitivity: float | None = None,
        min_included: int | None = None,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.clip = clip
        self.sensitivity = sensitivity if sensitivity is not None else clip
        self.placement = placement
        self.shares = shares
        self.min_included = max(1, min(shares, min_included if min_included is not None else shares))
        self.budget = epsilon
        self.acc = Accountant(accountant=accountant)
        self.rounds = 0
        self.events: list[dict[str, Any]] = []

    def effective_multiplier(self, info: RoundInfo, *, included: int | None = None) -> float:
        z = self.noise_multiplier * self.clip / self.sensitivity
        if self.placement == "clients":
            z *= math.sqrt((info.n_included if included is None else included) / self.shares)
        return z

    def spent(self) -> tuple[float, float]:
        return self.acc.epsilon(self.delta), self.delta

    def can_run(self, info: RoundInfo) -> tuple[bool, str]:
        if self.budget is None:
            return True, ""
        trial = self.acc.copy()
        # distributed noise: dropouts are not known yet, so charge the fewest survivors a round can have
        worst = min(info.n_included, self.min_included) if self.placement == "clients" else None
        trial.compose(_step_for(info, self.effective_multiplier(info, included=worst)))
        eps = trial.epsilon(self.delta)
        if eps > self.budget + _TOL:
            return False, (
                f"round {info.round} would raise client-level epsilon to {eps:.4f} > the budget "
                f"{self.budget:g} (delta={self.delta:g}); {self.rounds} rounds used epsilon "
                f"{self.acc.epsilon(self.delta):.4f}. Raise --epsilon, lower --rounds, or add noise"
            )
        return True, ""

    def record(self, info: RoundInfo, trainer_results: Mapping[int, TrainResult]) -> dict[str, Any]:
        if info.n_included == 0:
            return {"epsilon": self.acc.epsilon(self.delta), "delta": self.delta}
        z = self.effective_multiplier(info)
        step = _step_for(info, z)
        self.acc.compose(step)
        self.rounds += 1
        self.events.append({"round": info.round, "included": info.n_included, **step.as_dict()})
        eps = self.acc.epsilon(self.delta)
        return {
            "epsilon": eps,
            "delta": self.delta,
            "noise_multiplier": z,
            "sample_rate": step.sample_rate,
            "sampling": step.sampling,
            "steps": self.rounds,
        }

    def guarantees(self) -> tuple[Guarantee, ...]:
        """None of its own: the GaussianNoise layer states the DP-FedAvg claim in the ledger."""
        return ()

    def report(self) -> dict[str, Any]:
        eps = self.acc.epsilon(self.delta)
        steps = [{**s.as_dict(), "count": c} for s, c in sorted(self.acc.steps.items())]
        return {
            "accountant": self.acc.accountant,
            "accountant_used": self.acc.accountant_used,
            "delta": self.delta,
            "epsilon": eps,
            "target_epsilon": self.budget,
            "mechanisms": [
                {
                    "name": "dp-fedavg",
                    "level": "client",
                    "placement": "distributed" if self.placement == "clients" else "central",
                    "clip": self.clip,
                    "l2_sensitivity": self.sensitivity,
                    "noise_multiplier": self.noise_multiplier,
                    "steps": self.rounds,
                    "sample_rate": steps[0]["sample_rate"] if steps else None,
                    "sampling": steps[0]["sampling"] if steps else None,
                    "shares": self.shares if self.placement == "clients" else None,
                    "min_included": self.min_included if self.placement == "clients" else None,
                    "composition": steps,
                    "epsilon": eps,
                }
            ],
        }


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
            self.clients[cid] = Accountant(accountant=self.accountant)
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
                    "per-example gradients clipped, Gaussian noise from a CSPRNG, Poisson-sampled batches",
                    "one record per example (not per person); client-level membership is not hidden",
                    "floating-point Gaussian (Mironov 2012 caveat)",
                ),
                params={"epsilon": eps, "delta": self.delta, "accountant": self.accountant},
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
        return {
            "accountant": self.accountant,
            "accountant_used": self.accountant,
            "delta": self.delta,
            "epsilon": eps,
            "target_epsilon": self.budget,
            "mechanisms": [
                {
                    "name": "dp-sgd",
                    "level": "example",
                    "clients": clients,
                    "epsilon": eps,
                }
            ],
        }
