import subprocess
import sys

import drrl


def test_public_names():
    assert drrl.__all__ == sorted(
        ["CheckpointError", "ConfigError", "DataError", "DrrlError", "GPT", "GPTConfig", "RunConfig"]
        + ["__version__", "evaluate", "fit", "load"]
    )
    for name in drrl.__all__:
        assert getattr(drrl, name) is not None


def test_import_is_light_and_fit_survives_subpackage_imports():
    code = (
        "import sys, drrl; assert 'torch' not in sys.modules; "
        "import drrl.train.loop; assert callable(drrl.fit) and drrl.train.__name__ == 'drrl.train'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
