# smartbeam beamline session, part 3: the Tiled writer (live: events in batches).
writer = store.writer()
RE.subscribe(writer)
