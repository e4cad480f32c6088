"""Print the README's two opening shell commands (install + demo, install + tests), one per line.

CI runs exactly these lines, so the README cannot drift from what is tested.
"""

import re
import sys
from pathlib import Path

readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
lines = []
for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
    for raw in block.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
if len(lines) < 2:
    sys.exit("README.md: the first two ```bash blocks must hold the demo and the test commands")
print(lines[0])
print(lines[1])
