"""Model-based image rewards; importing this module registers them.

- ``pickscore``, ``clipscore``: :mod:`flowdppo.rewards.clip_rewards` (transformers CLIP).
- ``aesthetic``: :mod:`flowdppo.rewards.aesthetic` (LAION predictor v2 on CLIP ViT-L/14).
- ``hpsv2``: :mod:`flowdppo.rewards.hpsv2` (open_clip, optional dependency).

Every model loads offline, from a local path or the Hugging Face cache, on first use.
"""

from __future__ import annotations

from .aesthetic import AestheticMLP, aesthetic
from .clip_rewards import ClipSimilarity, clipscore, pickscore
from .hpsv2 import hpsv2

__all__ = ["AestheticMLP", "ClipSimilarity", "aesthetic", "clipscore", "hpsv2", "pickscore"]
