"""abvid.tools.bench: one benchmark per job; each ends with a JSON line (bench, throughput, unit, bound, ratio)."""
