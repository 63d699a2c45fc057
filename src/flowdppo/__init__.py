"""flowdppo: RL fine-tuning of flow-matching text-to-image models.

Layers (imports point down only): ``cli`` -> ``trainer`` / ``compare`` -> ``worlds`` ->
``models`` / ``rewards`` / ``prompts`` -> ``algorithms`` / ``advantages`` -> ``dynamics``.
The math layers import torch only. Registries (``registry.Registry``) live beside each
interface; ``builtins`` loads the built-in entries (worlds register their prompts, rewards
and base models themselves) on a registry's first read, so no lower layer names a higher one.
In the trainer each concern has one module: ``rollout`` (sampling), ``scoring`` (rewards ->
advantages), ``batches`` (replay inputs), ``update`` (the optimizer step), ``metrics``
(reduction), ``evaluation``, ``checkpoint`` / ``sharded_state`` / ``safe_state``,
``run_dir``; ``loop`` only sequences them.
"""

import time as _time

__version__ = "0.1.0"
# When flowdppo was first imported (the CLI imports it at start): start-up time is measured from here.
STARTED_AT = _time.perf_counter()
