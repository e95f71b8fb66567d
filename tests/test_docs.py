"""What the README and docs promise a new user stays true (issue 23 items 6-7)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_in_sync_with_the_code():
    """docs/config.md is generated from describe(); regenerate it with `python3 scripts/config_doc.py`."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_doc.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from k15sys.train.config import describe

    text = (ROOT / "docs" / "config.md").read_text()
    keys = [line.split()[0] for line in describe() if line.startswith("  ")]
    assert keys and all(f"- `{k}` " in text for k in keys)


def test_ci_runs_exactly_the_readme_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):readme.index("\n## ", readme.index("## Set-up") + 1)]
    blocks = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [install, test]
    assert ".venv/" in (ROOT / ".gitignore").read_text()


def test_trainer_is_exported_lazily():
    code = ("import sys, k15sys.train as t\n"
            "assert 'k15sys.train.trainer' not in sys.modules and 'torch' not in sys.modules\n"
            "from k15sys.train import Trainer, load_config, Config, ConfigError\n"
            "from k15sys.train.trainer import Trainer as T\n"
            "assert Trainer is T and load_config(None).run.output_dir\n"
            "assert set(t.__all__) <= set(dir(t))\n"
            "try:\n    t.Nope\nexcept AttributeError as e:\n    assert 'Nope' in str(e)\nelse:\n    raise SystemExit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
