# smartbeam beamline session, part 3: analysis routers in front of the Tiled writer
# (live: events in batches). Each router adds its derived stream to the same run:
# TenDqEstimator ("analysis", runs whose start document has "tendq"), FrameQualityMonitor
# ("frame_quality", a flag per frame of any run with a 2-D image) and LiveKDE ("kde", runs
# with a 2-D image; repeated frames are not summed); all leave every other run untouched.
import os

from smartbeam.session import analysis_chain

writer = store.writer()
analysis = analysis_chain(writer, png_dir=os.environ.get("SMARTBEAM_PNG_DIR", "."))
RE.subscribe(analysis)
