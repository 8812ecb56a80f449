"""Prepare a dataset alone, outside the flow: GSM8K (hub or local folder) -> train/test parquet with privileged context.

    python -m cli.preprocess --config configs/cpu_smollm2.yaml --output-dir outputs/data [--data-path DIR]

Prints the paths and the data stats as JSON. A sweep preset prepares its base config's data. A user error (a
missing folder, a row that breaks a rule, an unreachable hub) is one `error:` line with the fix.
"""

from __future__ import annotations

import argparse
import json
import sys

from pcsd_core.config.loader import load_config
from steps.errors import run_program
from steps.preprocess import preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    parser.add_argument("--output-dir", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--data-path", default=None, help="local GSM8K-style folder (overrides data.path)")
    args = parser.parse_args(argv)

    def prepare() -> int:
        overrides = {} if args.data_path is None else {"data.path": args.data_path}
        result = preprocess(load_config(args.config, overrides), args.output_dir)
        print(json.dumps({"train_path": str(result.train_path), "test_path": str(result.test_path), **result.stats},
                         indent=1))
        return 0

    return run_program("preprocess", prepare)


if __name__ == "__main__":
    sys.exit(main())
