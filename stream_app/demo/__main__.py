"""``python -m stream_app.demo``: runs ``tools/demo.py`` of the source checkout
(the demo starts the project's own broker, which lives in ``tools/``)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

script = Path(__file__).resolve().parents[2] / "tools" / "demo.py"
if not script.is_file():
    sys.exit("the demo runs from a source checkout: tools/demo.py is missing")
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
