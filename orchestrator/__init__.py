"""skd orchestrator: CLI, config, student trainer, sampling, losses."""
