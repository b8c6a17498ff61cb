# smartbeam beamline session, part 4: plans available at the prompt and in the queue.
from bluesky.plans import count, grid_scan, list_scan, rel_scan, scan  # noqa: F401
from bluesky.plan_stubs import mv, mvr, sleep  # noqa: F401

from smartbeam.plans import *  # noqa: F401,F403
