"""
Fine-tune EchoX on your own spoken data (`echox finetune`): `finetune` (the run, `finetune.py`), `user_records` (your
data → a training manifest, `user_data.py`), the model card (`model_card.py`).
"""

from .finetune import finetune
from .user_data import user_records

__all__ = ["finetune", "user_records"]
