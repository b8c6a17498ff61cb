"""Helpers that make the beamline session work as a bluesky-queueserver worker.

The queueserver describes each plan from ``inspect.signature`` and rebuilds the parameter
types by ``eval`` of their text. Modules written with ``from __future__ import annotations``
give it strings (``'Readable'``) that it cannot resolve, and then *every* item of that plan
is refused ("Model is not fully defined"). :func:`resolve_plan_annotations` evaluates those
strings once in the startup namespace, so plan modules can keep postponed annotations.

It also turns a protocol annotation (``endstation: Readable``) into a plain string
(``__READABLE__``), so a wrong device name would only fail when the item runs.
:func:`restrict_device_parameters` gives such parameters the queueserver's own custom
annotation: an enum of the devices of the right class in the startup namespace, so a
wrong name is refused when the item is added. The plans themselves stay generic.
"""

from __future__ import annotations

import copy
import inspect
import logging
import typing
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from .errors import SmartbeamInputError

__all__ = [
    "ADMIN_PREFIX",
    "compare_plan_lists",
    "make_admin_plans",
    "plan_signatures",
    "resolve_plan_annotations",
    "restrict_device_parameters",
]

logger = logging.getLogger(__name__)

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


def _protocol_shape(annotation: Any) -> str | None:
    """``"one"`` for a bluesky protocol, ``"list"`` for a sequence of one, else ``None``."""

    def is_protocol(a: Any) -> bool:
        return isinstance(a, type) and a.__module__ == "bluesky.protocols"

    if is_protocol(annotation):
        return "one"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, Sequence) and len(args) == 1 and is_protocol(args[0]):
        return "list"
    return None


def _device_names(namespace: Mapping[str, Any], classes: tuple[type, ...]) -> list[str]:
    return sorted(name for name, obj in namespace.items()
                  if not name.startswith("_") and isinstance(obj, classes))


def restrict_device_parameters(namespace: MutableMapping[str, Any],
                               families: Mapping[str, type | tuple[type, ...]]
                               ) -> dict[str, dict[str, list[str]]]:
    """Let the device parameters of queued plans accept only devices of the right class.

    For every plan in ``namespace`` whose name starts with a key of ``families``, each
    parameter annotated with a ``bluesky.protocols`` type (or a sequence of one) gets a
    queueserver custom annotation (``parameter_annotation_decorator``) whose device enum
    lists the devices of the family's class(es) found in ``namespace``. The queueserver
    then refuses an item naming any other device when it is added, with a message naming
    the parameter. The plan is replaced in ``namespace`` by the decorator's thin wrapper:
    same name, numpy docstring and (resolved) signature; called from IPython with device
    objects it behaves exactly as the plan. A parameter that already has a custom
    annotation keeps it (so calling this twice changes nothing).

    Call it after the devices exist and after :func:`resolve_plan_annotations`.

    Parameters
    ----------
    namespace
        The startup namespace (``globals()`` of the startup file).
    families
        Plan-name prefix -> device class (or tuple of classes), e.g.
        ``{"xmcd_": XMCDEndstation, "sans_": SANSDetector}``.

    Returns
    -------
    dict
        ``{plan name: {parameter name: [device names]}}`` of what was restricted.

    Raises
    ------
    SmartbeamInputError
        When a family's prefix is empty or its value is not a class or tuple of classes.
    """
    from bluesky_queueserver import parameter_annotation_decorator

    families = {p: c if isinstance(c, tuple) else (c,) for p, c in families.items()}
    for prefix, classes in families.items():
        if not prefix or not classes or not all(isinstance(c, type) for c in classes):
            raise SmartbeamInputError(
                f"family {prefix!r}: {classes!r}; expected a non-empty plan-name "
                "prefix mapped to a device class or a tuple of device classes")
    restricted: dict[str, dict[str, list[str]]] = {}
    for name, obj in list(namespace.items()):
        if name.startswith("_") or not inspect.isgeneratorfunction(obj):
            continue
        prefix = next((p for p in families if name.startswith(p)), None)
        if prefix is None:
            continue
        classes = families[prefix]
        # The enum's type name is what the queueserver shows as the parameter's type.
        type_name = "_or_".join(c.__name__ for c in classes)
        devices = _device_names(namespace, classes)
        sig = inspect.signature(obj, eval_str=True)
        existing = copy.deepcopy(getattr(obj, "_custom_parameter_annotation_", None) or {})
        params = existing.setdefault("parameters", {})
        done = {}
        for p in sig.parameters.values():
            shape = _protocol_shape(p.annotation)
            if shape is None or "annotation" in params.get(p.name, {}):
                continue
            params.setdefault(p.name, {}).update(
                annotation=type_name if shape == "one" else f"typing.List[{type_name}]",
                devices={type_name: list(devices)})
            done[p.name] = devices
        if not done:
            continue
        if not devices:
            logger.warning("plan %s: no %s in the session; every queued item will be refused",
                           name, type_name)
        # Decorate the undecorated plan (re-running the profile must not stack wrappers).
        base = obj.__wrapped__ if hasattr(obj, "_custom_parameter_annotation_") else obj
        wrapper = parameter_annotation_decorator(existing)(base)
        wrapper.__signature__ = sig
        namespace[name] = wrapper
        restricted[name] = done
    return restricted


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


def plan_signatures(path: str | Path) -> dict[str, list[tuple[str, str, str | None, dict | None]]]:
    """Plan names and (name, type, default, device enums) of their parameters.

    Parameters
    ----------
    path
        An ``existing_plans_and_devices.yaml`` written by ``qserver-list-plans-devices``.

    Returns
    -------
    dict
        ``{plan: [(parameter, type, default, devices), ...]}``; ``devices`` is the custom
        annotation's ``{type name: sorted device names}`` or ``None``.
    """
    import yaml

    def devices(p: dict) -> dict | None:
        enums = (p.get("annotation") or {}).get("devices")
        return {k: sorted(v) for k, v in enums.items()} if enums else None

    data = yaml.safe_load(Path(path).read_text()) or {}
    plans = data.get("existing_plans") or {}
    return {name: [(p["name"], (p.get("annotation") or {}).get("type"), p.get("default"),
                    devices(p))
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
