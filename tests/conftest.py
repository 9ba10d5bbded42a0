"""Suite-wide settings. Set before torch is imported anywhere in the test process."""

import os

# Two cores are shared by the test process and the servers it starts: sleeping OpenMP workers
# instead of spinning ones keep them from starving each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
