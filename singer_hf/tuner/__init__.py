from .registration import register

register()

from .config import SingerConfig  # noqa: E402
from .layer import SingerLayer, nullspace_basis, nullspace_directions, nullspace_matrix  # noqa: E402
from .model import SingerModel, basis_block, check_basis_blocks  # noqa: E402

__all__ = [
    "SingerConfig", "SingerLayer", "SingerModel", "basis_block", "check_basis_blocks", "nullspace_basis", "nullspace_directions",
    "nullspace_matrix",
]  # fmt: skip
