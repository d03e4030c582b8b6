"""Command-line entry points (`mtv-*`)."""
