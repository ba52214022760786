"""Jobs: the `vlm` command line, local training loops, and (later) Ray Train + DeepSpeed jobs."""
