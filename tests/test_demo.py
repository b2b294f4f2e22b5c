"""`cxrdx demo`: its steps call the library and print command lines the CLI accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cxrdx.cli import build_parser
from cxrdx.demo import DemoSettings, steps


def test_the_demo_does_not_import_the_cli():
    code = "import sys, cxrdx.demo; sys.exit('cxrdx.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_printed_command_line_is_one_the_cli_accepts():
    todo = steps(DemoSettings(out=Path("d")))
    assert [step.args[0] for step in todo] == [
        "phantoms",
        "prepare",
        "split",
        "stats",
        "train",
        "train",
        "evaluate",
        "evaluate",
        "compare",
        "phantoms",
        "prepare",
        "evaluate",
        "compare",
        "evaluate",
        "compare",
        "explain",
        "localize",
        "explain",
        "localize",
        "report",
    ]
    assert todo[0].args == [
        "phantoms",
        "--out",
        str(Path("d/phantoms")),
        "--n",
        "2000",
        "--size",
        "128",
        "--seed",
        "0",
        "--tail-floor",
        "0.03",
    ]
    parser = build_parser()
    for step in todo:
        assert parser.parse_args(step.args).command == step.args[0]
