from __future__ import annotations

import sys

from services.mesh.cli import main

sys.exit(main())
