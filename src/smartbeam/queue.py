"""Helpers that make the beamline session work as a bluesky-queueserver worker.

The queueserver describes each plan from ``inspect.signature`` and rebuilds the parameter
types by ``eval`` of their text. Modules written with ``from __future__ import annotations``
give it strings (``'Readable'``) that it cannot resolve, and then *every* item of that plan
is refused ("Model is not fully defined"). :func:`resolve_plan_annotations` evaluates those
strings once in the startup namespace, so plan modules can keep postponed annotations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from .errors import SmartbeamInputError

__all__ = [
    "ADMIN_PREFIX",
    "compare_plan_lists",
    "make_admin_plans",
    "plan_signatures",
    "resolve_plan_annotations",
]

# Plans and functions whose names start with this are kept out of the primary user group
# by profile_collection/startup/user_group_permissions.yaml.
ADMIN_PREFIX = "admin_"


def _resolved_signature(func: Callable) -> inspect.Signature | None:
    sig = inspect.signature(func)
    if not any(isinstance(p.annotation, str) for p in sig.parameters.values()):
        return None
    return inspect.signature(func, eval_str=True)


def resolve_plan_annotations(namespace: MutableMapping[str, Any]) -> list[str]:
    """Replace string annotations of the plans in ``namespace`` by the types they name.

    Parameters
    ----------
    namespace
        The startup namespace (``globals()`` of the last startup file).

    Returns
    -------
    list of str
        Names of the plans whose signature was resolved.

    Raises
    ------
    SmartbeamInputError
        When an annotation names a type its module does not define (a plan bug).
    """
    resolved = []
    for name, obj in list(namespace.items()):
        if name.startswith("_") or not inspect.isgeneratorfunction(obj):
            continue
        try:
            sig = _resolved_signature(obj)
        except (NameError, SyntaxError) as exc:
            raise SmartbeamInputError(
                f"plan {name!r}: annotation cannot be resolved ({exc}); expected types "
                "importable in its module") from exc
        if sig is not None:
            # inspect.signature honours __signature__, and so does the queueserver.
            obj.__signature__ = sig
            resolved.append(name)
    return resolved


def make_admin_plans(RE) -> dict[str, Callable]:
    """Admin-only plans bound to a RunEngine (kept from the primary group by permissions).

    Parameters
    ----------
    RE
        The session's RunEngine, whose persistent ``md`` the plans change.

    Returns
    -------
    dict
        ``{"admin_set_scan_id": plan}``.
    """
    import bluesky.plan_stubs as bps

    def admin_set_scan_id(scan_id: int):
        """Set the persisted scan counter (e.g. at the start of a beam-time cycle).

        Parameters
        ----------
        scan_id
            The counter value; the next run gets ``scan_id + 1``. Must be >= 0.
        """
        if not isinstance(scan_id, int) or isinstance(scan_id, bool) or scan_id < 0:
            raise SmartbeamInputError(f"scan_id={scan_id!r}: expected an integer >= 0")
        RE.md["scan_id"] = scan_id
        yield from bps.null()

    return {"admin_set_scan_id": admin_set_scan_id}


def plan_signatures(path: str | Path) -> dict[str, list[tuple[str, str, str | None]]]:
    """Plan names and (name, type, default) of their parameters from a plan-list YAML.

    Parameters
    ----------
    path
        An ``existing_plans_and_devices.yaml`` written by ``qserver-list-plans-devices``.
    """
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    plans = data.get("existing_plans") or {}
    return {name: [(p["name"], (p.get("annotation") or {}).get("type"), p.get("default"))
                   for p in desc.get("parameters", [])]
            for name, desc in plans.items()}


def compare_plan_lists(committed: str | Path, regenerated: str | Path) -> list[str]:
    """Differences in plan names/parameters between two plan-list YAML files.

    Parameters
    ----------
    committed, regenerated
        The file in the startup directory and a freshly generated one.

    Returns
    -------
    list of str
        One human-readable line per difference; empty when the lists agree.
    """
    a, b = plan_signatures(committed), plan_signatures(regenerated)
    out = [f"plan {n!r} is missing from {Path(committed).name}" for n in sorted(set(b) - set(a))]
    out += [f"plan {n!r} no longer exists" for n in sorted(set(a) - set(b))]
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            out.append(f"plan {name!r}: parameters {a[name]} != {b[name]}")
    return out
