# smartbeam beamline session, part 4: plans available at the prompt and in the queue.
from bluesky.plans import count, grid_scan, list_scan, rel_scan, scan  # noqa: F401
from bluesky.plan_stubs import mv, mvr, sleep  # noqa: F401

from smartbeam.plans import *  # noqa: F401,F403

# Queueserver: admin-only plans (kept from the primary group by user_group_permissions.yaml),
# and plan signatures with real types instead of postponed-annotation strings.
from smartbeam.queue import make_admin_plans, resolve_plan_annotations, restrict_device_parameters

globals().update(make_admin_plans(RE))
resolve_plan_annotations(globals())

# The queueserver reads `endstation: Readable` as "any string": each science family's device
# parameter accepts only this session's instruments of its class, so a wrong device name is
# refused when the item is added. Plans called here with device objects are unchanged.
from smartbeam.devices import STXM, SANSDetector, XMCDEndstation

restrict_device_parameters(globals(), {"xmcd_": XMCDEndstation, "xas_": XMCDEndstation,
                                       "stxm_": STXM, "sans_": SANSDetector})
