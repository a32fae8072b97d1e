"""Adversary: an honest-but-curious server (follows the protocol, keeps and studies everything it sees).

What holds (ledger: "an honest-but-curious server colluding with at most t - 1 clients"): each masked
input is uniform in Z_2^k whatever the input; the server learns the sum of the included inputs and nothing
that separates two input vectors with the same sum; a client declared dropped keeps its input hidden even
if its masked input arrives late, because only its mask key (never its self-mask seed) is revealed.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from fl.spec import RoundInfo, ValueSpec
from fl.sums.secagg import SecAgg
from secagg._hazmat import kex, prg, shamir
from secagg.machine import Message
from secagg.masking._common import PAIR_MASK_LABEL, pair_context
from secagg.masking.messages import MaskedInput, UnmaskRequest, UnmaskResponse
from tests.adversary import harness as h

N, T, D = 5, 3, 400


def _view(vals: dict[int, np.ndarray]) -> tuple[np.ndarray, list[Message]]:
    cls = h.clients(vals, t=T, min_cohort=N, auth=False)
    srv = h.server(N, D, t=T, pubs=None)
    seen: list[Message] = []

    def up(m: Message) -> Message:
        seen.append(m)
        return m

    return h.drive(srv, cls, up=up, down=up), seen


def test_masked_inputs_are_uniform_whatever_the_input() -> None:
    zero = {c: np.zeros(D, np.uint64) for c in range(N)}
    spike = dict(zero)
    spike[0] = np.full(D, (1 << 23) - 1, np.uint64)
    for vals in (zero, spike):
        _, seen = _view(vals)
        y0 = next(m.y for m in seen if isinstance(m, MaskedInput) and m.sender == 0)
        # uniform on [0, 2^24): a KS test cannot tell (p well above any sane alpha)
        assert stats.kstest(np.asarray(y0, dtype=np.float64) / h.MOD, "uniform").pvalue > 1e-4


def test_two_inputs_with_the_same_sum_give_the_same_result_and_only_one_kind_of_share() -> None:
    rng = np.random.default_rng(1)
    a = {c: rng.integers(0, 1 << 16, D, dtype=np.uint64) for c in range(N)}
    b = dict(a)
    b[0] = (a[0] + np.uint64(5)) % np.uint64(h.MOD)  # same sum in Z_2^k, different inputs
    b[1] = (a[1] + np.uint64(h.MOD - 5)) % np.uint64(h.MOD)
    ra, seen_a = _view(a)
    rb, _ = _view(b)
    assert np.array_equal(ra, rb)
    for m in seen_a:
        if isinstance(m, UnmaskRequest):
            assert not set(m.alive) & set(m.dropped)
        if isinstance(m, UnmaskResponse):
            assert not m.s_shares  # nobody dropped: the server never sees a mask-key share


def test_a_late_masked_input_of_a_dropped_client_stays_masked() -> None:
    """The server treats client 4 as dropped (its mask key is reconstructed) but keeps its late upload."""
    vals = h.values(N, D)
    cls = h.clients(vals, t=T, min_cohort=N, auth=False)
    srv = h.server(N, D, t=T, pubs=None)
    late: list[MaskedInput] = []
    s_shares: list[tuple[int, int]] = []

    def up(m: Message) -> Message | None:
        if isinstance(m, MaskedInput) and m.sender == 4:
            late.append(m)
            return None
        if isinstance(m, UnmaskResponse) and 4 in m.dropped:
            s_shares.append((m.sender + 1, shamir.decode_share(m.s_shares[m.dropped.index(4)])))
        return m

    total = h.drive(srv, cls, up=up)
    assert np.array_equal(total, sum(v for c, v in vals.items() if c != 4) & np.uint64(h.MOD - 1))
    s4 = kex.private_from_bytes(shamir.combine(s_shares[:T], threshold=T))
    y = np.array(late[0].y, copy=True)
    exp = prg.MaskExpander(D, y.dtype)
    for v in range(4):  # strip every pairwise mask of client 4: only its self-mask is left
        seed = kex.agree(s4, cls[v]._dir[v][1], label=PAIR_MASK_LABEL, context=pair_context(h.SESSION, 1, 4, v))
        exp.add(y, seed, -1 if v > 4 else +1)
    left = y.astype(np.uint64) & np.uint64(h.MOD - 1)
    assert not np.array_equal(left, vals[4])
    assert stats.kstest(left.astype(np.float64) / h.MOD, "uniform").pvalue > 1e-4


def test_the_ledger_names_the_curious_server_bound() -> None:
    spec = ValueSpec(size=D, cohort=10, domain="ring", modulus=h.MOD, value_bits=16)
    info = RoundInfo(round=0, planned=tuple(range(10)), included=tuple(range(10)), population=10, sample_rate=1.0)
    (g,) = SecAgg(threshold=0.7).guarantees(spec, info)
    assert g.against == "an honest-but-curious server colluding with at most 6 clients"
    assert g.params["max_colluders"] == 6 and g.params["max_dropouts"] == 3
