"""Static safety: what the packages may import and call, checked on the syntax tree (``ast``, not grep).

Claims (issue 9): nothing received from another party selects code -- so ``secagg``, ``dp`` and ``fl``
contain no pickle (nor ``copyreg``/``marshal``/``shelve``, ``torch.load`` without ``weights_only=True``,
``numpy.load(allow_pickle=True)``), no ``eval``/``exec``/``__import__`` and no ``importlib``; and
cryptographic primitives (``cryptography``, ``hashlib``, ``hmac``, ``secrets``, PyCryptodome, NaCl) are
imported only inside ``secagg/_hazmat`` (``phe``/``gmpy2`` only in the Paillier modules).

The allow-list below names each remaining exception, file by file, with why it is there; it must stay
small and exact: an entry that no longer matches anything fails the test too (delete it when fixed).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("secagg", "dp", "fl")

NO_CODE_FROM_DATA = {"pickle", "cPickle", "_pickle", "copyreg", "marshal", "shelve", "dill", "cloudpickle",
                     "importlib", "pickletools"}
CRYPTO = {"cryptography", "hashlib", "hmac", "secrets", "Crypto", "Cryptodome", "nacl"}
PAILLIER_ONLY = {"phe", "gmpy2"}
DYNAMIC_CALLS = {"__import__", "eval", "exec", "compile"}

ALLOWED: dict[tuple[str, str], str] = {
    # (file, what): why. Each is a finding for the module's owner, not a design choice to keep.
    ("fl/cli/main.py", "importlib"): "importlib.metadata.version('privagg') for --version only; no module is imported",
    ("fl/training/seeds.py", "hashlib"): "SHA-256 of public config values for per-client seeds and test-seam ids",
    ("fl/training/server.py", "torch.load"): "resume reads a local checkpoint with weights_only=False "
                                           "(a pickle of a file this user wrote); to be replaced by an explicit codec",
    ("fl/data/stats.py", "hashlib"): "SHA-256 of the named test seam's seed for the statistics sum's session id",
    ("fl/testing/assertions.py", "hashlib"): "SHA-256 of a test's node id for a reproducible audit seed tag",
    ("dp/rng.py", "cryptography"): "SecureRandom's AES-CTR stream (a CSPRNG primitive outside secagg/_hazmat)",
    ("dp/rng.py", "hashlib"): "SHA-256 of the named test seam's seed",
    ("secagg/paillier/keys.py", "hashlib"): "key fingerprint and hash-to-Z_n* for fixed-base randomness (Paillier)",
    ("secagg/paillier/ciphertexts.py", "hashlib"): "SHA-256 digest of a ciphertext batch (transit corruption check)",
    ("secagg/paillier/_fast.py", "secrets"): "Paillier encryption randomness r and exponents",
}


def _in_hazmat(rel: str) -> bool:
    return rel.startswith("secagg/_hazmat/")


def _in_paillier(rel: str) -> bool:
    return rel.startswith(("secagg/paillier", "secagg/_paillier"))


def _files() -> Iterator[tuple[str, ast.Module]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(), filename=rel)


def _imported_roots(tree: ast.Module) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def _kw_true(call: ast.Call, name: str) -> bool | None:
    for kw in call.keywords:
        if kw.arg == name:
            return isinstance(kw.value, ast.Constant) and kw.value.value is True
    return None


def _risky_calls(tree: ast.Module) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in DYNAMIC_CALLS:
            yield f.id, node.lineno
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            owner, attr = f.value.id, f.attr
            if owner == "torch" and attr == "load" and _kw_true(node, "weights_only") is not True:
                yield "torch.load", node.lineno
            elif owner in ("np", "numpy") and attr == "load" and _kw_true(node, "allow_pickle"):
                yield "numpy.load(allow_pickle=True)", node.lineno
            elif attr == "import_module":
                yield "import_module", node.lineno


def findings() -> list[tuple[str, str, int, str]]:
    """``(file, what, line, rule)`` for every violation, before the allow-list."""
    out: list[tuple[str, str, int, str]] = []
    for rel, tree in _files():
        for root, line in _imported_roots(tree):
            if root in NO_CODE_FROM_DATA:
                out.append((rel, root, line, "imports a module that turns data into code"))
            elif root in CRYPTO and not _in_hazmat(rel):
                out.append((rel, root, line, "imports a cryptographic primitive outside secagg/_hazmat"))
            elif root in PAILLIER_ONLY and not (_in_paillier(rel) or _in_hazmat(rel)):
                out.append((rel, root, line, "imports phe/gmpy2 outside the Paillier modules"))
        for what, line in _risky_calls(tree):
            out.append((rel, what, line, "calls code chosen at run time, or unpickles"))
    return out


def test_packages_run_no_code_from_data_and_keep_crypto_in_hazmat() -> None:
    bad = [f"{rel}:{line}: {what} ({rule})" for rel, what, line, rule in findings()
           if (rel, what) not in ALLOWED]  # import_module is never allowed: no module is chosen by a string
    assert not bad, "\n".join(["forbidden in secagg/dp/fl (see tests/test_static_safety.py):", *bad])


def test_the_allow_list_is_exact() -> None:
    found = {(rel, what) for rel, what, _, _ in findings()}
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"allow-list entries that no longer match anything (delete them): {stale}"


@pytest.mark.parametrize("source,expected", [
    ("import pickle\n", "pickle"),
    ("from copyreg import pickle\n", "copyreg"),
    ("import importlib\nimportlib.import_module(name)\n", "import_module"),
    ("__import__(msg.codec)\n", "__import__"),
    ("import torch\ntorch.load(p)\n", "torch.load"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)\n", "numpy.load(allow_pickle=True)"),
    ("from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n", "cryptography"),
    ("import hmac\n", "hmac"),
])
def test_the_checker_catches_each_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                       expected: str) -> None:
    """The checker itself: a planted violation in a package file is reported (so a pass means something)."""
    (tmp_path / "fl").mkdir()
    (tmp_path / "fl" / "planted.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert expected in {what for _, what, _, _ in findings()}
    ok = "import torch\ntorch.load(p, weights_only=True)\nmodel.eval()\n"
    (tmp_path / "fl" / "planted.py").write_text(ok)
    assert findings() == []
