from .registration import register

register()

from .config import SingerConfig  # noqa: E402
from .layer import SingerLayer, nullspace_basis, nullspace_directions  # noqa: E402
from .model import SingerModel  # noqa: E402

__all__ = ["SingerConfig", "SingerLayer", "SingerModel", "nullspace_basis", "nullspace_directions"]
