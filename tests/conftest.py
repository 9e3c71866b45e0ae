"""Test setup: never touch the network, keep torch on few threads (CI has 2 cores)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threading overhead dominates, and a shared 2-core CPU makes 2 threads far slower (OpenMP spinning); the one place tests set it
