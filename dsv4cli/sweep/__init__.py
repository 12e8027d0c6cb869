"""`dsv4 sweep`: train a grid of spec variants with the `dsv4 train` machinery and compare them.

grid.py    `--vary` lists -> variants (cartesian or zipped), readable slugs, their `--set` items (no torch)
run.py     validate every variant, then train them one by one into DIR/<slug>/ (resumable)
summary.py one row per variant from its run directory (metrics.jsonl): table, JSON, curves.png
"""
