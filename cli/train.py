"""Run the PCSD engine alone, outside the Metaflow flow.

    python -m cli.train --config configs/cpu_smollm2.yaml --train-parquet data/train.parquet \
        --set train.lr=1e-5 --set train.total_training_steps=8

`--set section.field=value` overrides a config field (repeatable); values are parsed as YAML scalars
(`1e-5`, `true`, `8`), by the same parser as the flow's `--set`. `--check` validates the preset with its
overrides, prints the resolved config and exits (any preset of `configs/` loads; a sweep preset's grid is
the flow's business, so the engine trains the base config). Metrics are printed as one JSON line per step on stdout (`--metrics-jsonl` also
writes them to a file). The final checkpoint folder is printed on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pcsd_core.config.loader import load_preset, parse_overrides
from pcsd_core.errors import InputNotFoundError
from steps.errors import run_program


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cli.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/cpu_smollm2.yaml")
    parser.add_argument("--train-parquet", help="train split written by pcsd_core.data.prepare.prepare_dataset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable)")
    parser.add_argument("--metrics-jsonl", default="", help="also append each step's metrics to this file")
    parser.add_argument("--check", action="store_true", help="validate the config, print it resolved, and exit")
    return parser


def open_metrics_file(path: Path, resumed_step: int):
    """Open the metrics file for appending; on a resume first drop the lines of steps after the checkpoint.

    A run killed after its step-2 checkpoint may have logged step 3; the resumed run logs step 3 again, so the
    old line goes (the file is rewritten to a temporary name and renamed: a kill now loses nothing).
    """
    if resumed_step and path.is_file():
        lines = path.read_text().splitlines()
        kept = [line + "\n" for line in lines if _step_of(line, default=resumed_step + 1) <= resumed_step]
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)
    return open(path, "a")


def _step_of(line: str, default: int) -> int:
    """The step of a metrics line; `default` for a blank line or one torn by the kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return default


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_program("train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from pcsd_core.engine.trainer import Distiller

    preset = load_preset(args.config, parse_overrides(args.overrides))
    cfg = preset.base
    if preset.sweep:
        print(f"note: {args.config} holds a sweep grid ({', '.join(preset.sweep)}); the engine CLI trains one "
              "config, the preset's base. Run the flow for the sweep: python flows/pcsd_flow.py --config config "
              f"{args.config} run", file=sys.stderr)
    if args.check:
        print(cfg.to_yaml(), end="")
        return 0
    if not args.train_parquet or not Path(args.train_parquet).is_file():
        raise InputNotFoundError(f"--train-parquet {args.train_parquet!r} does not exist; prepare it with "
                                 "`python -m cli.preprocess` (or the flow's preprocess step).")
    metrics_file = None

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        line = json.dumps({"step": step, **metrics})
        print(line, flush=True)
        if metrics_file:
            metrics_file.write(line + "\n")
            metrics_file.flush()

    distiller = Distiller(cfg, args.train_parquet, log_metrics=log_metrics)
    try:
        distiller.setup()
        if args.metrics_jsonl:
            metrics_file = open_metrics_file(Path(args.metrics_jsonl), resumed_step=distiller.start_step)
        result = distiller.train()
    finally:
        distiller.close()
        if metrics_file:
            metrics_file.close()
    print(f"final checkpoint: {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
