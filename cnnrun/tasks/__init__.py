"""The tasks a run can perform (``task=...``): train, summary, eval, validate, export. Each is one module."""

TASKS = {
    "train": "cnnrun.tasks.train",
    "summary": "cnnrun.tasks.summary",
    "eval": "cnnrun.tasks.evaluate",
    "validate": "cnnrun.tasks.validate",
    "export": "cnnrun.tasks.export",
}
