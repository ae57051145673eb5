"""Paths and constants shared by the benchmark's parts."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
PIXELS_PER_CLASS = 5000  # pixel memory that pixel-contrast methods keep, per class
LOADED_THRESHOLD = 1.5  # 1-minute load average above which timings are flagged as loaded
