"""depthsite settings, split by concern; every value from the environment comes through depthsite.env."""
from .base import *  # noqa: F401,F403
from .database import *  # noqa: F401,F403
from .queue import *  # noqa: F401,F403
from .rest import *  # noqa: F401,F403
from .depthsite import *  # noqa: F401,F403
from .logging import *  # noqa: F401,F403
