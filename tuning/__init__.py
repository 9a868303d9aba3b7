"""lukern autotuner (installed as ``lukern_tuning``)."""
