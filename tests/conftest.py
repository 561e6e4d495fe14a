"""Test-wide settings: one torch thread per process.

The tiny pipelines gain nothing from intra-op threads, and with several processes on a 2-core machine
(CI runs subprocess tests beside the main one) oversubscribed threads make them 10-50x slower.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
