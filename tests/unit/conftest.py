"""Unit-test setup: keep Hypothesis' on-disk caches out of the repository.

Hypothesis writes example databases and a constants cache under ``.hypothesis/`` in the
working directory; the unit tests do no I/O beyond temporary files, so point it at a
temporary directory that is removed when the test process ends.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

from hypothesis.configuration import set_hypothesis_home_dir

_HOME = tempfile.mkdtemp(prefix="gridq-unit-hypothesis-")
set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
