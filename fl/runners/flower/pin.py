"""Node-side app pin: a privagg SuperNode runs only app code its operator trusts.

A Flower run ships a Flower App Bundle (FAB) from the SuperLink to every SuperNode, and the node runs
the ClientApp the FAB names, importing code the FAB may contain. Whoever submits a run would otherwise
be trusted with code on every site. The pin (installed by ``privagg flower supernode``, i.e.
:func:`fl.runners.flower.supernode_main`) checks every new run's FAB before the node stores it:

* accepted: a FAB that holds only ``pyproject.toml`` (plus Flower's ``.info/`` metadata) and whose
  components are exactly the INSTALLED privagg apps (``fl.runners.flower:client_app``); its code comes
  from the privagg package on this node, not from the server;
* accepted: a FAB whose SHA-256 is listed in the node policy's ``trusted_app_hashes``;
* everything else is refused: the node logs it and replies with Flower's ``INVALID_FAB`` error, and
  the run's messages are never handed to a ClientApp. (``allow_any_app`` switches the pin off, for
  benchmarks of other apps on a test cluster.)

Flower's own app verification (``--trusted-entities``) needs a SuperLink that signs FABs (Flower's
hosted platform); a local SuperLink does not, so privagg pins the app on the node instead.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable
from typing import Any

from fl.runners.flower.policy import NodePolicy

__all__ = ["PRIVAGG_COMPONENTS", "PinUnavailableError", "UntrustedAppError", "check_fab", "install_app_pin"]

log = logging.getLogger(__name__)

PRIVAGG_COMPONENTS = {"serverapp": "fl.runners.flower:server_app", "clientapp": "fl.runners.flower:client_app"}
"""The components of the only app a default node runs (both resolve to the installed privagg package)."""

_ALLOWED_FILES = ("pyproject.toml",)


class UntrustedAppError(RuntimeError):
    """The run's Flower app bundle is not one this node's policy trusts."""


class PinUnavailableError(RuntimeError):
    """This Flower version has no hook for the pin; the node refuses to start rather than run unpinned."""


def _app_config(content: bytes) -> dict[str, Any]:
    from flwr.common.config import get_fab_config

    try:
        return dict(get_fab_config(content))
    except Exception as exc:  # Flower raises several types for a malformed bundle
        raise UntrustedAppError(f"the app bundle cannot be read: {exc}") from exc


def check_fab(content: bytes, policy: NodePolicy) -> None:
    """Raise :class:`UntrustedAppError` unless ``content`` (a FAB) is an app ``policy`` trusts."""
    from secagg._hazmat.pki import sha256_hex

    if policy.allow_any_app:
        return
    digest = sha256_hex(content)
    if digest in policy.trusted_app_hashes:
        return
    try:
        names = zipfile.ZipFile(io.BytesIO(content)).namelist()
    except zipfile.BadZipFile as exc:
        raise UntrustedAppError(f"the app bundle {digest[:12]} is not a zip file") from exc
    code = sorted(n for n in names if n not in _ALLOWED_FILES and not n.startswith(".info/"))
    if code:
        raise UntrustedAppError(
            f"the app bundle {digest[:12]} ships its own files {code[:5]}; this node runs only the installed "
            "privagg ClientApp (add the bundle's SHA-256 to the policy's trusted_app_hashes to trust it)"
        )
    components = _app_config(content).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if dict(components) != PRIVAGG_COMPONENTS:
        raise UntrustedAppError(
            f"the app bundle {digest[:12]} names components {dict(components)}, not the installed privagg apps "
            f"{PRIVAGG_COMPONENTS}; add its SHA-256 {digest} to the policy's trusted_app_hashes to trust it"
        )


def _pinned(original: Callable[..., Any], policy: NodePolicy) -> Callable[..., Any]:
    """Wrap Flower's ``_pull_and_store_message``: check each new run's FAB; refuse with an error reply."""
    import flwr.supernode.start_client_internal as sci
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    def pull_and_store(**kw: Any) -> Any:
        receive, get_fab = kw["receive"], kw["get_fab"]
        last: dict[str, Any] = {}

        def recording_receive() -> Any:
            got = receive()
            if got is not None:
                last["msg"] = got[0]
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            check_fab(fab.content, policy)
            return fab

        try:
            return original(**{**kw, "receive": recording_receive, "get_fab": checked_get_fab})
        except UntrustedAppError as exc:
            msg = last["msg"]
            log.error("refusing run %s: %s", msg.metadata.run_id, exc)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=f"UntrustedAppError: {exc}"), reply_to=msg)
            sci._insert_message(reply, kw["state"], kw["object_store"])
            return msg.metadata.run_id

    return pull_and_store


def install_app_pin(policy: NodePolicy) -> None:
    """Install the pin into this process's Flower SuperNode loop; :class:`PinUnavailableError` if impossible."""
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError as exc:
        raise PinUnavailableError(f"this Flower version has no flwr.supernode.start_client_internal ({exc})") from exc
    original = getattr(sci, "_pull_and_store_message", None)
    if original is None or not callable(getattr(sci, "_insert_message", None)):
        raise PinUnavailableError(
            "this Flower version moved the SuperNode's message intake; privagg cannot pin the app it runs. "
            "Use the Flower version privagg supports (flwr>=1.41,<2) or Flower's --trusted-entities"
        )
    if getattr(original, "__privagg_pin__", False):
        return
    wrapped = _pinned(original, policy)
    wrapped.__privagg_pin__ = True  # type: ignore[attr-defined]
    sci.__dict__["_pull_and_store_message"] = wrapped
