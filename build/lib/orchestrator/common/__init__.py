"""Code both sides of a run execute, on the driver and on the workers: task definitions and encoded rows
(`task`), GLUE metrics (`metrics`) and model evaluation (`evaluation`), the sampling distributions and the
seeded sampler (`sampling`), IR schedules (`schedule`), the checkpoint format (`checkpointing`), a
failure's one-line report (`failures`), the stop protocol between driver and workers (`control`) and the
progress line the workers print and the driver shows (`console`).
"""
