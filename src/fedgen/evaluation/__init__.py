"""Metrics. Importing this package makes torch-fidelity's Inception module importable without torchvision.

torch-fidelity (the standard FID Inception port, used by torchmetrics) is installed without its dependencies,
because its torchvision requirement pulls CUDA wheels that fail to import here (docs/DESIGN.md §6). Its package
`__init__` imports torchvision-based extractors, so once it is installed, torchmetrics' own
`import torch_fidelity.feature_extractor_inceptionv3` would fail. Registering the package as a bare namespace
(its directory, without running `__init__`) lets that module and its torch-only helpers import normally.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _register_torch_fidelity_namespace() -> bool:
    if "torch_fidelity" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_fidelity"] = package
    return True


TORCH_FIDELITY_AVAILABLE = _register_torch_fidelity_namespace()
