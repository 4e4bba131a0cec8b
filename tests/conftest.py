import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

# tests/vm runs inside the QEMU guest (tests/test_guest_tier.py boots it); on the
# host it is not collected at all, so nothing there shows up as skipped.
collect_ignore = [] if os.environ.get("NVMEVFIO_IN_GUEST") == "1" else ["vm"]
