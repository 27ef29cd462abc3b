"""What the driver does once per run, in the process that started it: read the inputs (`inputs`), make the
run plan (`plan`, `knowledge_plan`), open the knowledge source (`sources`), start or join Ray (`runtime`),
run the TorchTrainer inside an MLflow run and turn its result into the summary (`runner`), write the run's
outputs (`outputs`) and its lineage (`lineage`). It reaches the workers only through the worker spec
(`orchestrator.worker.spec`) and the train loop it hands to Ray Train (`orchestrator.worker.train_loop`).
"""
