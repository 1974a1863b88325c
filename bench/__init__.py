"""The benchmark: ``make bench`` (``python -m bench.run``); README section "Performance"."""
