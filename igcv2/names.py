"""What a model's name and a version may be: the store's folder names, also what requests may address.

Kept apart from the artifact (which needs torch) so settings can be checked without importing torch.
"""

from __future__ import annotations

import re

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch only: $ also matches before a final \n
VERSION_TEXT = re.compile(r"[1-9][0-9]{0,17}")  # a version as clients write it: ASCII digits int() takes, no 0
