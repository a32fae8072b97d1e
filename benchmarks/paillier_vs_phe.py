"""Packed Paillier sums (secagg.paillier) against phe's one-EncryptedNumber-per-value, on the same work.

K clients each hold d signed 32-bit fixed-point values (what ``Quantize(bits=32)`` produces). A round is:
every client encrypts its vector, the aggregator adds the K ciphertext vectors, the key holder decrypts
the total. Both sides are timed in this one run:

* ours: the whole vectors, with ``workers`` processes (default: all cores);
* phe: ``public_key.encrypt(int)`` per value, ``EncryptedNumber`` additions, ``private_key.decrypt`` --
  single process, as the usual per-value code runs. For large d phe is measured on a sample of values
  and extrapolated linearly (``phe_extrapolated`` in the JSON; marked ``*`` in the table).

The critical path is one client's encryption (clients encrypt in parallel on their own machines) + the
sum of the K ciphertext vectors + the key holder's decryption; ``end_to_end_ratio`` is phe's critical
path over ours. Every sum is checked against the exact integer sum.

    python benchmarks/paillier_vs_phe.py                 # 2048-bit, d = 1e4, 1e5, 1e6; 3072-bit d = 1e5
    python benchmarks/paillier_vs_phe.py --quick         # smoke run (seconds)
    python benchmarks/paillier_vs_phe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secagg.paillier import (
    CiphertextBatch,
    PackingPlan,
    PaillierPrivateKey,
    PaillierPublicKey,
    Randomness,
    add_batches,
    decrypt_vector,
    encrypt_vector,
    generate_keypair,
)
from secagg.paillier import _fast as fast

T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """Run ``fn``; return (result, wall seconds, CPU seconds of this process and its pool workers).

    The worker pool is shut down (and so reaped) after the step, so that ``RUSAGE_CHILDREN`` counts it:
    CPU seconds do not depend on what else runs on the machine, wall seconds do.
    """
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    for pool in list(fast._POOLS.values()):
        pool.shutdown(wait=True)
    fast._POOLS.clear()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - p0 + (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return out, wall, cpu


def _ours(
    pk: PaillierPublicKey,
    sk: PaillierPrivateKey,
    vecs: list[np.ndarray],
    value_bits: int,
    randomness: Randomness,
    workers: int | None,
) -> dict[str, float]:
    k, d = len(vecs), vecs[0].size
    plan = PackingPlan.for_key(pk, value_bits=value_bits, summands=k)
    enc_wall: list[float] = []
    enc_cpu: list[float] = []
    batches: list[CiphertextBatch] = []
    for v in vecs:
        b, wall, cpu = _timed(partial(encrypt_vector, v, pk, plan, randomness=randomness, workers=workers))
        batches.append(b)
        enc_wall.append(wall)
        enc_cpu.append(cpu)
    agg, t_sum, c_sum = _timed(lambda: add_batches(batches, pk, workers=workers))
    total, t_dec, c_dec = _timed(lambda: decrypt_vector(agg, sk, workers=workers))
    exact = np.sum(np.stack(vecs), axis=0)
    if not np.array_equal(total, exact):
        raise SystemExit("ours: decrypted total differs from the exact integer sum")
    t_enc, c_enc = float(np.mean(enc_wall)), float(np.mean(enc_cpu))
    cores = fast.resolve_workers(workers)
    return {
        "slots": plan.slots,
        "enc_s": t_enc,
        "sum_s": t_sum,
        "dec_s": t_dec,
        "encrypt_vps": d / t_enc,
        "sum_vps": d * (k - 1) / t_sum if k > 1 and t_sum > 0 else float("inf"),
        "decrypt_vps": d / t_dec,
        "bytes_per_value": len(batches[0].data) / d,
        "critical_path_s": t_enc + t_sum + t_dec,
        "critical_path_cpu_s": c_enc + c_sum + c_dec,
        "critical_path_ideal_s": (c_enc + c_sum + c_dec) / cores,
    }


def _phe(pk: PaillierPublicKey, sk: PaillierPrivateKey, vecs: list[np.ndarray], sample: int) -> dict[str, float | bool]:
    """phe per value; wall and CPU seconds per value for each step, on the first ``sample`` values."""
    k, d = len(vecs), vecs[0].size
    s = min(sample, d)
    ppk, psk = pk.to_phe(), sk.to_phe()
    cols = [[int(x) for x in v[:s]] for v in vecs]

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    w0, c0 = clock()
    enc = [ppk.encrypt(x) for x in cols[0]]
    w1, c1 = clock()
    # the other clients' ciphertexts: adding one re-used EncryptedNumber costs the same as adding fresh ones
    other = [ppk.encrypt(x) for x in cols[1]] if k > 1 else []
    w2, c2 = clock()
    sums = []
    for i in range(s):
        acc = enc[i]
        for _ in range(1, k):
            acc = acc + other[i]  # one EncryptedNumber addition (a ciphertext product mod n^2)
        sums.append(acc)
    w3, c3 = clock()
    dec = [psk.decrypt(c) for c in sums]
    w4, c4 = clock()
    expect = [cols[0][i] + (k - 1) * cols[1][i] if k > 1 else cols[0][i] for i in range(s)]
    if dec != expect:
        raise SystemExit("phe: decrypted total differs from the exact integer sum")
    ct_bytes = (ppk.nsquare.bit_length() + 7) // 8
    return {
        "encrypt_vps": s / (w1 - w0),
        "sum_vps": (k - 1) * s / (w3 - w2) if k > 1 else float("inf"),
        "decrypt_vps": s / (w4 - w3),
        "bytes_per_value": ct_bytes,
        "critical_path_s": d / s * ((w1 - w0) + (w3 - w2) + (w4 - w3)),
        "critical_path_cpu_s": d / s * ((c1 - c0) + (c3 - c2) + (c4 - c3)),
        "extrapolated": s < d,
        "sample": s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small d, small phe sample")
    ap.add_argument("--clients", type=int, default=10, help="K, clients per round (default 10)")
    ap.add_argument("--d", type=str, default=None, help="comma-separated vector lengths (2048-bit rows)")
    ap.add_argument("--value-bits", type=int, default=32)
    ap.add_argument("--phe-sample", type=int, default=None, help="values phe is timed on (default 200)")
    ap.add_argument("--workers", type=int, default=None, help="processes for ours (default: all cores)")
    ap.add_argument("--no-3072", action="store_true", help="skip the 3072-bit row")
    ap.add_argument("--json", type=Path, default=None, help="write {'rows': [...]} here")
    args = ap.parse_args(argv)

    k, vb = args.clients, args.value_bits
    if args.quick:
        configs: list[tuple[int, int, Randomness]] = [(2048, 2_000, "fixed-base"), (2048, 500, "full")]
        sample = args.phe_sample or 20
    else:
        ds = [int(float(x)) for x in args.d.split(",")] if args.d else [10_000, 100_000, 1_000_000]
        configs = [(2048, d, "fixed-base") for d in ds] + [(2048, 10_000, "full")]
        if not args.no_3072:
            configs.append((3072, 100_000, "fixed-base"))
        sample = args.phe_sample or 200
    rng = np.random.default_rng(0)
    bound = (1 << (vb - 1)) - 1
    keys: dict[int, tuple[PaillierPublicKey, PaillierPrivateKey]] = {}
    rows: list[dict[str, Any]] = []
    print(
        f"K={k} clients, {vb}-bit fixed point, ours with {args.workers or os.cpu_count()} processes, phe single "
        f"process; load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    hdr = (
        f"{'bits':>5} {'d':>9} {'rand':>10} {'slots':>5} | {'enc v/s ours':>12} {'phe':>7} | {'dec v/s ours':>12} "
        f"{'phe':>6} | {'B/val ours':>10} {'phe':>4} | {'crit s ours':>11} {'phe':>10} {'ratio':>6} | "
        f"{'cpu-crit ours/2':>15} {'phe':>9} {'ratio':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for bits, d, randomness in configs:
        if bits not in keys:
            keys[bits] = generate_keypair(bits=bits)
        pk, sk = keys[bits]
        vecs = [rng.integers(-bound, bound + 1, size=d) for _ in range(k)]
        vecs[0][:2] = [bound, -bound]
        ours = _ours(pk, sk, vecs, vb, randomness, args.workers)
        phe = _phe(pk, sk, vecs, sample)
        ratio = float(phe["critical_path_s"]) / ours["critical_path_s"]
        ratio_cpu = float(phe["critical_path_cpu_s"]) / ours["critical_path_ideal_s"]
        star = "*" if phe["extrapolated"] else " "
        print(
            f"{bits:>5} {d:>9} {randomness:>10} {ours['slots']:>5} | {ours['encrypt_vps']:>12,.0f} "
            f"{phe['encrypt_vps']:>7,.0f} | {ours['decrypt_vps']:>12,.0f} {phe['decrypt_vps']:>6,.0f} | "
            f"{ours['bytes_per_value']:>10.2f} {phe['bytes_per_value']:>4.0f} | {ours['critical_path_s']:>11.2f} "
            f"{phe['critical_path_s']:>9.0f}{star} {ratio:>5.0f}x | {ours['critical_path_ideal_s']:>15.2f} "
            f"{phe['critical_path_cpu_s']:>8.0f}{star} {ratio_cpu:>5.0f}x"
        )
        rows.append(
            {
                "key_bits": bits,
                "K": k,
                "d": d,
                "value_bits": vb,
                "randomness": randomness,
                "slots_per_ciphertext": ours["slots"],
                "ours_encrypt_vps": ours["encrypt_vps"],
                "phe_encrypt_vps": phe["encrypt_vps"],
                "ours_sum_vps": ours["sum_vps"],
                "phe_sum_vps": phe["sum_vps"],
                "ours_decrypt_vps": ours["decrypt_vps"],
                "phe_decrypt_vps": phe["decrypt_vps"],
                "ours_bytes_per_value": ours["bytes_per_value"],
                "phe_bytes_per_value": phe["bytes_per_value"],
                "ours_encrypt_s": ours["enc_s"],
                "ours_sum_s": ours["sum_s"],
                "ours_decrypt_s": ours["dec_s"],
                "ours_critical_path_s": ours["critical_path_s"],
                "phe_critical_path_s": phe["critical_path_s"],
                "end_to_end_ratio": ratio,
                "ours_critical_path_cpu_s": ours["critical_path_cpu_s"],
                "ours_critical_path_uncontended_s": ours["critical_path_ideal_s"],
                "phe_critical_path_cpu_s": phe["critical_path_cpu_s"],
                "end_to_end_ratio_uncontended": ratio_cpu,
                "phe_extrapolated": phe["extrapolated"],
                "phe_sample": phe["sample"],
                "workers": args.workers or os.cpu_count(),
            }
        )
    print(
        f"* phe measured on {sample} values per step and extrapolated linearly to d. crit = one client's "
        f"encryption + sum of K ciphertext vectors + decryption, wall seconds as measured (this machine is "
        f"shared, see the load average); cpu-crit = the same steps' CPU seconds (ours: parent + pool "
        f"workers, divided by the {fast.resolve_workers(args.workers)} workers = the critical path on "
        f"otherwise idle cores; phe: single process). ratio = phe / ours."
    )
    for r in rows:
        if r["key_bits"] == 2048 and r["d"] >= 1_000_000 and r["randomness"] == "fixed-base":
            print(
                f"targets (2048-bit, d={r['d']:.0e}): ratio {r['end_to_end_ratio']:.0f}x (>= 150), critical path "
                f"{r['ours_critical_path_s']:.1f} s wall (<= 45: encrypt {r['ours_encrypt_s']:.1f} + sum "
                f"{r['ours_sum_s']:.1f} + decrypt {r['ours_decrypt_s']:.1f}), "
                f"{r['ours_critical_path_uncontended_s']:.1f} s on idle cores (CPU s / workers; ratio "
                f"{r['end_to_end_ratio_uncontended']:.0f}x), {r['ours_bytes_per_value']:.2f} bytes/value (<= 10)"
            )
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
