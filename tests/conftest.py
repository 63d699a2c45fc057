import sys
from pathlib import Path

import torch

# Tests import small helpers (fake_model) from this folder.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
