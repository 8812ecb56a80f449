"""Beyond one process: the Ray cluster, FSDP2 train workers (or the same actor in-process), bucketed weight sync."""
