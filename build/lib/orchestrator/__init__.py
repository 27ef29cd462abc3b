"""skd orchestrator, in rooms by where the code runs: `commands/` and `driver/` in the driver process,
`worker/` on every Ray Train worker, `common/` on both, `tracking/` (MLflow) on the driver and rank 0,
`config/` read on the driver. The teacher actors' code is the `actors` package below.
"""
