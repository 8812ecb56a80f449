"""`python -m dashboards --latest` is `python -m dashboards.report --latest`."""

from dashboards.report import main

main()
