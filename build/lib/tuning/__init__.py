"""skd tuning: Ray Tune campaigns over sampling distributions, MLflow parent/child runs, reports."""
