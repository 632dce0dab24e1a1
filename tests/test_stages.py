"""The library without Prefect: the store and the stages import with no ``prefect`` package."""

from __future__ import annotations

import os
import subprocess
import sys


def test_sae_imports_without_prefect():
    code = ("import sys; sys.modules['prefect'] = None\n"
            "import sae, sae.stages, sae.store, sae.store.keys, sae.distributed, sae.sweep, sae.collection\n"
            "assert not any(name == 'prefect' or name.startswith('prefect.') for name, module in sys.modules.items()\n"
            "               if module is not None)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                            timeout=120)
    assert result.returncode == 0, result.stderr
