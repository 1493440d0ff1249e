"""``nn_core.batch``: the former name of ``nn_core.app.jobs`` (batch work over an Executor)."""

from .app.jobs import *  # noqa: F403
from .app.jobs import __all__  # noqa: F401
