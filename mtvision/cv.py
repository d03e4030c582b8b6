"""OpenCV, imported once with its own thread pool switched off.

DataLoader workers are forked processes: a child forked while OpenCV's pthread pool is in use
inherits its locks and can hang in the next OpenCV call.  mtvision parallelises over samples (data
workers), not inside OpenCV calls, so every module imports cv2 from here: `from mtvision.cv import cv2`.
"""

import cv2

cv2.setNumThreads(0)

__all__ = ["cv2"]
