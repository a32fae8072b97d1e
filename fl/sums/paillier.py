"""``PaillierSum``: the secure sum of a pipeline done with packed Paillier encryption.

Clients encrypt their quantized update under one Paillier public key; the aggregator (the server)
multiplies ciphertexts -- it never holds a decryption key and sees only ciphertexts -- and sends the
encrypted total to the key holder, who decrypts it and returns the plaintext sum.

Who holds the key (``key_holder``):

* ``"separate"``: a third party at address :data:`secagg.machine.KEY_HOLDER` (supplied by
  :meth:`PaillierSum.parties`). It learns the round's sum and nothing else (it never sees an individual
  client's ciphertext, and refuses aggregates of fewer than ``min_clients``). The aggregator learns the
  sum too (it is the round's result). Assumption: the key holder does not collude with the aggregator.
* ``"clients"``: FATE's horizontal setting -- all clients share one key pair, the server only
  aggregates. The lowest-id surviving client decrypts (the next one if it drops) and returns the sum to
  the server; every client could decrypt, so the aggregator must collude with *no* client, and clients
  must never see each other's ciphertexts (the aggregator does not forward them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from numpy.typing import NDArray

from fl.spec import CompositionError, Guarantee, RoundInfo, ValueSpec
from secagg.errors import OverflowRiskError, ProtocolError
from secagg.machine import KEY_HOLDER, ClientMachine, ServerMachine
from secagg.paillier import (
    PackingPlan,
    PaillierClient,
    PaillierKeyHolder,
    PaillierPrivateKey,
    PaillierPublicKey,
    PaillierServer,
    generate_keypair,
    security_bits,
)
from secagg.ring import is_ring_modulus

__all__ = ["PaillierSum"]


@dataclass(frozen=True)
class PaillierSum:
    """Packed Paillier secure sum (see the module docstring for who learns what).

    ``key_bits``: 2048 (112-bit security) or 3072 (128-bit). ``randomness``: ``"fixed-base"`` (DJN
    short-exponent ``h^a``, fast; extra short-exponent assumption) or ``"full"`` (``r^n`` for uniform
    ``r``; DCR only). ``min_clients``: the round aborts below it, and the key holder refuses to decrypt
    fewer. ``workers``: processes for encryption/addition/decryption (``None`` = all cores).

    The key pair is generated once per object, lazily, so a whole training run uses one key.
    """

    key_bits: int = 2048
    key_holder: Literal["separate", "clients"] = "separate"
    randomness: Literal["fixed-base", "full"] = "fixed-base"
    min_clients: int = 2
    workers: int | None = None
    _keys: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.key_bits < 1024:
            raise CompositionError(f"PaillierSum(key_bits=...) must be >= 1024 (2048 recommended), got {self.key_bits}")
        if self.key_holder not in ("separate", "clients"):
            raise CompositionError(f"key_holder must be 'separate' or 'clients', got {self.key_holder!r}")
        if self.randomness not in ("fixed-base", "full"):
            raise CompositionError(f"randomness must be 'fixed-base' or 'full', got {self.randomness!r}")
        if self.min_clients < 2:
            raise CompositionError(
                f"min_clients must be >= 2 (the sum of one client is that client's update), got {self.min_clients}"
            )

    @property
    def hides_updates(self) -> bool:
        """True: the aggregator sees only ciphertexts; the key holder decrypts only the sum."""
        return True

    @property
    def name(self) -> str:
        return "paillier"

    # -- keys ----------------------------------------------------------------------------------------

    def _keypair(self) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
        if "private" not in self._keys:
            if "public" in self._keys:
                raise ProtocolError(
                    "this PaillierSum is a copy that carries only the public key (pickles and deep copies "
                    "drop the private key): decrypt with the object that generated the key pair"
                )
            public, private = generate_keypair(bits=self.key_bits)
            self._keys["public"], self._keys["private"] = public, private
        return self._keys["public"], self._keys["private"]

    @property
    def public_key(self) -> PaillierPublicKey:
        """The run's public key (the pair is generated on first use)."""
        if "public" in self._keys:
            return cast(PaillierPublicKey, self._keys["public"])
        return self._keypair()[0]

    def adopt_public_key(self, public: PaillierPublicKey) -> PaillierSum:
        """Encrypt to ``public``, another party's key (a key-holder node's); returns ``self``.

        This object then never holds or generates a private key: :meth:`parties` and a shared-key client
        refuse. Used where the key pair lives elsewhere (the Flower runner's key-holder node).
        """
        if public.bits != self.key_bits:
            raise CompositionError(
                f"the key holder's public key has {public.bits} bits but this PaillierSum plans for key_bits="
                f"{self.key_bits}: make the key with `privagg flower paillier-keygen --bits {self.key_bits}`"
            )
        held = self._keys.get("public")
        if "private" in self._keys or (held is not None and held != public):
            raise ProtocolError("this PaillierSum already uses another key pair; build a fresh one for this key")
        self._keys["public"] = public
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickles and deep copies keep the public key and drop the private key (it never travels)."""
        state = dict(self.__dict__)
        state["_keys"] = {"public": self._keys["public"]} if "public" in self._keys else {}
        return state

    def plan(self, spec: ValueSpec) -> PackingPlan:
        """The packing plan for a bound spec: ``spec.value_bits`` per value, ``spec.cohort`` summands."""
        if spec.value_bits is None:
            raise CompositionError("PaillierSum encrypts integers: put Quantize(bits=...) before it")
        try:
            return PackingPlan(self.key_bits, spec.value_bits, spec.cohort)
        except OverflowRiskError as exc:
            raise CompositionError(str(exc)) from exc

    # -- SecureSum -------------------------------------------------------------------------------------

    def min_included(self, spec: ValueSpec) -> int:
        """The fewest clients a decrypted sum may have (the key holder refuses fewer)."""
        return self.min_clients

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "ring" or spec.value_bits is None or spec.modulus is None:
            raise CompositionError("PaillierSum encrypts integers: put Quantize(bits=...) before it")
        if spec.cohort < self.min_clients:
            raise CompositionError(
                f"a Paillier sum over a cohort of {spec.cohort} client(s) would decrypt fewer than min_clients="
                f"{self.min_clients} updates, revealing them: sample a cohort of at least {self.min_clients}"
            )
        if not is_ring_modulus(spec.modulus):
            raise CompositionError("PaillierSum needs a power-of-two ring modulus <= 2^64 (use Quantize)")
        plan = self.plan(spec)
        if (1 << plan.slot_bits) > spec.modulus:
            raise CompositionError(
                f"the ring Z_{spec.modulus} is too small for the sum of {spec.cohort} {spec.value_bits}-bit "
                f"values; let Quantize size the ring for the cohort"
            )
        return spec

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        public = self.public_key
        private = self._keypair()[1] if self.key_holder == "clients" else None
        return PaillierClient(
            cid,
            value,
            session,
            round,
            public,
            self.plan(spec),
            randomness=self.randomness,
            workers=self.workers,
            modulus=spec.modulus,
            private=private,
            min_summands=self.min_clients,
        )

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        return PaillierServer(
            list(cids),
            spec.size,
            session,
            round,
            self.public_key,
            self.plan(spec),
            min_clients=self.min_clients,
            decryptor=KEY_HOLDER if self.key_holder == "separate" else None,
            modulus=spec.modulus,
            workers=self.workers,
        )

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        if self.key_holder != "separate":
            return {}
        _, private = self._keypair()
        return {
            KEY_HOLDER: PaillierKeyHolder(
                KEY_HOLDER, private, session, round, workers=self.workers, min_summands=self.min_clients
            )
        }

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        plan = self.plan(spec)
        holder = (
            "a separate key holder (address KEY_HOLDER) that learns only the sum"
            if self.key_holder == "separate"
            else "every client (shared key pair, FATE horizontal); the lowest-id surviving client decrypts"
        )
        assumptions = [
            "honest-but-curious aggregator and key holder (Paillier is malleable: a malicious aggregator "
            "could alter the sum, or pad one client's ciphertext with encryptions of zero it made and have "
            "that update decrypted as a 'sum'; the key holder cannot tell, since summand counts are the "
            "aggregator's word)",
            "IND-CPA of Paillier under the Decisional Composite Residuosity (DCR) assumption",
        ]
        if self.key_holder == "separate":
            assumptions.append("the key holder does not collude with the aggregator")
        else:
            assumptions.append("no client colludes with the aggregator (every client holds the private key)")
        if self.randomness == "fixed-base":
            assumptions.append(
                f"short-exponent indistinguishability of h^a with {2 * security_bits(self.key_bits)}-bit a "
                f"(Damgard-Jurik-Nielsen 2010 fixed-base randomness)"
            )
        prop = (
            "input privacy against the aggregator: it sees only Paillier ciphertexts of each "
            "client's update; the sum is revealed to the key holder and the aggregator"
        )
        against = "the aggregation server (and anyone without the private key)"
        if info.n_included == 1:  # the decrypted "sum" of one client is that client's update
            prop, against = "none: a sum of one client's update is that update", "no one"
        return (
            Guarantee(
                layer=self.name,
                property=prop,
                against=against,
                assumptions=tuple(assumptions),
                params={
                    "key_bits": self.key_bits,
                    "key_holder": holder,
                    "slots_per_ciphertext": plan.slots,
                    "slot_bits": plan.slot_bits,
                    "randomness": self.randomness,
                    "min_clients": self.min_clients,
                    "key_fingerprint": self.public_key.fingerprint.hex(),
                },
            ),
        )
