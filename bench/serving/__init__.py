"""The serving benchmark (`mxext bench`, `python -m bench`): load an OpenAI-compatible server and
report TTFT, TPOT, ITL, end-to-end latency and throughput. See docs/BENCHMARK_TOOL.md.

Modules: options (settings), client (asyncio HTTP + streaming requests), datasets, metrics,
runner (arrivals, concurrency, sweep), report (console, log file), plots (PNG), config_runner
(the YAML file), cli (the flags).
"""
