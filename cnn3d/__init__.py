"""cnn3d: a 3D cellular neural network student that learns to carry sentence embeddings.

Public API: ``Config``, ``preset``, ``with_overrides``, ``flatten``, ``build_model``.
Importing the package has no side effects (no logging setup, no device probing).
"""

from .config import Config, ConfigError, flatten, load_config, preset, save_config, with_overrides
from .model import LatticeStudent, StudentOutput, build_model

__all__ = [
    "Config",
    "ConfigError",
    "LatticeStudent",
    "StudentOutput",
    "build_model",
    "flatten",
    "load_config",
    "preset",
    "save_config",
    "with_overrides",
]
__version__ = "0.1.0"
