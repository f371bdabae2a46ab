"""The tasks a run can perform (``task=...``): train, summary, eval, validate, predict, export. Each is one module."""

TASKS = {
    "train": "cnnrun.tasks.train",
    "summary": "cnnrun.tasks.summary",
    "eval": "cnnrun.tasks.evaluate",
    "validate": "cnnrun.tasks.validate",
    "predict": "cnnrun.tasks.predict",
    "export": "cnnrun.tasks.export",
}
