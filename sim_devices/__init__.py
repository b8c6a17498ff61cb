"""Simulated twins of the smartbeam instruments.

``physics``: ground-truth sample models (XMCD ferromagnet, STXM domains, SANS spheres);
``iocs``: caproto IOCs serving them over EPICS Channel Access
(``python -m sim_devices ioc xmcd|stxm|sans --port N``); ``ophyd_twins``: in-process
ophyd devices on the same physics for unit tests; ``launcher``: IOC subprocesses.
Ground truth is for tests and benchmarks, never for plans.
"""
