"""flowdppo: RL fine-tuning of flow-matching text-to-image models.

Layers (imports point down only): ``cli`` -> ``trainer`` -> ``models``/``rewards``
-> ``algorithms``/``advantages`` -> ``dynamics``. The math layers import torch only.
"""

__version__ = "0.1.0"
