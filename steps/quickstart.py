"""Print where to look after `make run`: the MLflow UI, the Metaflow cards, the sweep report.

    python -m steps.quickstart            # `make run` calls it after `python flows/pcsd_flow.py run`
"""

from __future__ import annotations

from steps.finish import where_to_look


def main() -> None:
    print(where_to_look())


if __name__ == "__main__":
    main()
