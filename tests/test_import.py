"""`import ckptstore` stays light: cloud SDKs load only when their URL is used.

Specification: STYLE.md ("Backends are imported lazily, so `import ckptstore`
must not import boto or google libraries").
"""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("boto3", "botocore", "aiobotocore", "s3fs", "gcsfs", "google", "lightning", "pytorch_lightning",
         "transformers", "accelerate")


def modules_after(code: str) -> list[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY]


def test_import_ckptstore_does_not_import_cloud_sdks():
    assert heavy(modules_after("import ckptstore")) == []


def test_local_and_memory_round_trips_do_not_import_cloud_sdks(tmp_path):
    code = (
        "import ckptstore, torch\n"
        f"ckptstore.save({{'w': torch.ones(3)}}, {str(tmp_path / 'c')!r})\n"
        f"ckptstore.load({str(tmp_path / 'c')!r})\n"
        "ckptstore.save({'w': torch.ones(3)}, 'memory://import-test/c')\n"
        "ckptstore.load('memory://import-test/c')\n"
        "ckptstore.verify('memory://import-test/c', deep=True)\n"
    )
    assert heavy(modules_after(code)) == []


def test_cli_help_does_not_import_cloud_sdks():
    code = (
        "import runpy\n"
        "sys.argv = ['ckptstore', '--help']\n"
        "try:\n    runpy.run_module('ckptstore', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    )
    assert heavy(modules_after(code)) == []
