"""soma-mesh: the local supervisor (see services/mesh/supervisor.py and cli.py).

`Mesh`, `MeshOptions` and `start_mesh` are re-exported lazily so that importing
`services.mesh.topology` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Mesh", "MeshOptions", "start_mesh"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from services.mesh import supervisor

        return getattr(supervisor, name)
    raise AttributeError(name)
