"""``nn_core.generate``: the public name of the generation API (``nn_core.inference.generate``).

Kept so that ``from nn_core.generate import generate, stream`` works as the README shows.
"""

from .inference.generate import *  # noqa: F403
from .inference.generate import __all__  # noqa: F401
