"""What every CLINC150 benchmark shares: offline settings, this checkout first on ``sys.path``, and the
shared teacher and data (``../shared`` beside the checkout, or beside its parent for a worktree).

Imported by the scripts as ``from _shared import ...`` (a script's own folder is on its path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = next((d for d in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if d.is_dir()), ROOT.parent / "shared")
TEACHER = SHARED / "models" / "clinc150-minilm-l6"
DATA = SHARED / "data" / "clinc150" / "data_oos_plus.json"
DOMAINS = SHARED / "data" / "clinc150" / "domains.json"
