"""Hydra multirun sweeps, tracked in MLflow as one parent run with a child run per job.

One job per module:

- :mod:`~cnnrun.sweep.callback`: the Hydra callback (``hydra.callbacks.sweep`` in conf/config.yaml) that opens
  the parent run before any job starts and writes the summary when the sweep ends.
- :mod:`~cnnrun.sweep.job`: what a running job knows about its sweep (number, overrides, parent run).
- :mod:`~cnnrun.sweep.state`: the files in the sweep directory that carry that across processes (joblib).
- :mod:`~cnnrun.sweep.parent`: creating, reusing and closing the parent run.
- :mod:`~cnnrun.sweep.resume`: skipping jobs whose config already has a FINISHED run.
- :mod:`~cnnrun.sweep.resources`: CPU threads and GPU per job for parallel sweeps.
- :mod:`~cnnrun.sweep.objective`: the number a job returns to the sweeper, and ranking by it.
- :mod:`~cnnrun.sweep.summary`: the table of jobs, printed and recorded on the parent.

Nothing here imports MLflow or a framework at module import: single runs pay nothing for it.
"""
