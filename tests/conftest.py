"""Test-session settings that must be in place before torch is imported."""

import os

# Sleeping (not spinning) OpenMP threads: on a busy 2-core machine spinning threads slow every
# process down 5-20x (docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
