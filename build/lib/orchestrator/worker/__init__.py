"""What runs on every Ray Train worker at every step: the spec it receives (`spec`), the recipe loop
(`train_loop`), the step's rows (`batches`), the knowledge feed (`feed`) with its membership (`membership`)
and the adaptive sampler (`adaptive`), the student trainer (`trainer`), the losses (`losses`), GSNR probes
(`gsnr`) and the teacher-usage and system metrics of rank 0 (`usage`). Nothing here imports the driver or
the commands.
"""
