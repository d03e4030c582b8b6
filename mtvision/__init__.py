"""mtvision: multi-task dense prediction for computer vision."""

__version__ = "0.1.0"
