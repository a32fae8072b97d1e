"""fl: federated training that composes privacy layers (``dp``) and secure sums (``secagg``)."""

from typing import Any

# the Python API (fl.api), imported on first use so ``import fl`` stays cheap (torch loads with it)
_API = ("DPSGD", "DpRelease", "FederatedResult", "private_sum", "secure_sum", "train")
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        from fl import api

        return getattr(api, name)
    raise AttributeError(f"module 'fl' has no attribute {name!r}")
