"""abvid.tools: the CLI, the toy-corpus generator, configuration and benchmarks."""
