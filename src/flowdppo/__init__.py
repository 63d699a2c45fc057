"""flowdppo: RL fine-tuning of flow-matching text-to-image models.

Layers (imports point down only): ``cli`` -> ``trainer`` -> ``models``/``rewards``
-> ``algorithms``/``advantages`` -> ``dynamics``. The math layers import torch only.
"""

import time as _time

__version__ = "0.1.0"
# When flowdppo was first imported (the CLI imports it at start): start-up time is measured from here.
STARTED_AT = _time.perf_counter()
