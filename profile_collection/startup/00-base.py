# smartbeam beamline session, part 1: EPICS, RunEngine, run store.
#
# Environment: SMARTBEAM_SIM=1 (default) starts the simulated twins on loopback;
# SMARTBEAM_SIM=0 with SMARTBEAM_PREFIX_XMCD/_STXM/_SANS uses the beamline's IOCs.
# SMARTBEAM_DATA_DIR / SMARTBEAM_TILED_URI choose the run store, SMARTBEAM_MD_DIR where
# scan_id and other RunEngine metadata persist.
import os

os.environ.setdefault("MPLBACKEND", "Agg" if not os.environ.get("DISPLAY") else "QtAgg")

from smartbeam.beamline import Beamline  # noqa: E402

# The twins (or the site's address list) must be set up before ophyd is imported.
beamline = Beamline(time_scale=float(os.environ.get("SMARTBEAM_TIME_SCALE", "1.0")))
beamline.start_iocs()

from bluesky.callbacks.best_effort import BestEffortCallback  # noqa: E402

from smartbeam.session import make_run_engine, open_storage  # noqa: E402

RE = make_run_engine()
store = open_storage()
# Journal of every run until Tiled has all of it: if the store goes away mid-run the run
# is kept there and `smartbeam replay DIR` puts it in later (see smartbeam.storage).
os.environ.setdefault("SMARTBEAM_BACKUP_DIR",
                      str(store.data_dir) + "-journal" if store.data_dir else
                      os.path.expanduser("~/.smartbeam-journal"))
bec = BestEffortCallback()
# Derived streams are not for live plots, and a headless session (the queueserver worker)
# draws none: replotting on every event made an adaptive XMCD scan ~200x slower.
bec.noplot_streams.extend(["decisions", "moments", "kde", "tendq", "analysis"])
if os.environ.get("MPLBACKEND", "").lower() == "agg":
    bec.disable_plots()
RE.subscribe(bec)
print(f"smartbeam: runs go to {store.location}; scan_id is at {RE.md.get('scan_id', 0)}")
