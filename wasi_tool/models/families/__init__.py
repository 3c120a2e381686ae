"""Model families: one ``ModelFamily`` per family in its own module (timm, torchvision,
Hugging Face, plain PyTorch), and the registry that asks them (base.py).

Adding a family is one ``ModelFamily`` subclass and one ``register_family`` call
(``tests/models/test_family_registry.py`` does it with a toy family).
"""

from wasi_tool.models.families.base import (
    CAUSAL_LM,
    CLASSIFIER,
    InputSpec,
    ModelFamily,
    PathModel,
    Task,
    arch_family,
    enable_token_drop_,
    families,
    family_for_arch,
    family_for_path,
    family_of,
    get_family,
    register_family,
    task_of,
    token_drop_refusal,
    unregister_family,
)
from wasi_tool.models.families.custom import CustomFamily, PlainFamily
from wasi_tool.models.families.hf import HFFamily
from wasi_tool.models.families.timm import TimmFamily
from wasi_tool.models.families.torchvision import TorchvisionFamily

# Asked in this order: each claims its own models and names (timm after the others: asking it
# imports timm), plain PyTorch last, the fallback.
for _family in (CustomFamily(), TorchvisionFamily(), HFFamily(), TimmFamily(), PlainFamily()):
    register_family(_family)

__all__ = [
    "CAUSAL_LM",
    "CLASSIFIER",
    "CustomFamily",
    "HFFamily",
    "InputSpec",
    "ModelFamily",
    "PathModel",
    "PlainFamily",
    "Task",
    "TimmFamily",
    "TorchvisionFamily",
    "arch_family",
    "enable_token_drop_",
    "families",
    "family_for_arch",
    "family_for_path",
    "family_of",
    "get_family",
    "register_family",
    "task_of",
    "token_drop_refusal",
    "unregister_family",
]
