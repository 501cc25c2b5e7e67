"""Command-line tools; each runs as `python -m tools.NAME` or `python tools/NAME.py`."""
