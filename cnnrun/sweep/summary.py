"""The sweep's summary: every job, its status and objective, best first; printed and written to the parent run.

Rows come from the job records in the sweep directory (every job writes one, including failed and skipped
ones), completed with what MLflow recorded (test accuracy; runs of jobs that never wrote a record because the
sweep was stopped).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from cnnrun.sweep.objective import rank, usable
from cnnrun.sweep.state import JobRecord, SweepState

SHOWN_METRICS = ("test_acc",)


@dataclass
class Row:
    num: int
    overrides: List[str]
    status: str
    objective: Optional[float] = None
    run_id: Optional[str] = None
    error: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class Summary:
    state: SweepState
    rows: List[Row]
    sweep_dir: Path

    def ranked(self) -> List[Row]:
        return rank(self.rows, lambda r: r.objective if r.status in ("FINISHED", "SKIPPED") else None,
                    self.state.direction)

    def best(self) -> Optional[Row]:
        ranked = self.ranked()
        if ranked and ranked[0].status in ("FINISHED", "SKIPPED") and usable(ranked[0].objective):
            return ranked[0]
        return None

    def counts(self) -> Dict[str, int]:
        counts = {"total": len(self.rows), "finished": 0, "skipped": 0, "failed": 0, "killed": 0}
        for row in self.rows:
            key = row.status.lower()
            if key in counts:
                counts[key] += 1
        return counts

    def outcome(self, status: str) -> str:
        c = self.counts()
        return (f"{status.lower()}: {c['finished']} finished, {c['skipped']} skipped, {c['failed']} failed, "
                f"{c['killed']} killed of {c['total']}")

    def varying(self, row: Row) -> str:
        """A row's overrides that differ between jobs (the ones every job shares say nothing here)."""
        common = set.intersection(*(set(r.overrides) for r in self.rows)) if len(self.rows) > 1 else set()
        shown = [o for o in row.overrides if o not in common]
        return " ".join(shown) or "(no overrides)"

    def records(self) -> List[Dict[str, str]]:
        out = []
        for row in self.ranked():
            out.append({
                "job": str(row.num),
                "overrides": self.varying(row),
                "status": row.status,
                self.state.objective: "" if row.objective is None else f"{row.objective:.4f}",
                **{m: (f"{row.metrics[m]:.4f}" if m in row.metrics else "") for m in SHOWN_METRICS},
                "run": row.run_id or "",
                "error": one_line(row.error or ""),
            })
        return out

    def csv(self) -> str:
        records = self.records()
        if not records:
            return ""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()

    def markdown(self) -> str:
        """The table for the parent run's description (MLflow renders it on the run page), runs linked."""
        records = self.records()
        lines = [f"**{self.outcome('sweep')}**, ranked by `{self.state.objective}` ({self.state.direction})", ""]
        if records:
            head = [k for k in records[0] if k != "error" or any(rec["error"] for rec in records)]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for rec in records:
                cells = {k: str(rec[k]).replace("|", "\\|") for k in head}
                if rec["run"] and self.state.experiment_id:
                    cells["run"] = f"[{rec['run'][:8]}](#/experiments/{self.state.experiment_id}/runs/{rec['run']})"
                lines.append("| " + " | ".join(cells[k] for k in head) + " |")
        return "\n".join(lines)

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        ranked_by = f"{self.state.objective} ({'higher' if self.state.direction == 'maximize' else 'lower'} is better)"
        table = Table(title=f"sweep: {len(self.rows)} jobs, best first by {ranked_by}", show_edge=False)
        records = self.records()
        columns = [c for c in (list(records[0]) if records else ["job", "overrides", "status"]) if c != "error"]
        for column in columns:
            table.add_column(column, justify="right" if column in (self.state.objective, "job", *SHOWN_METRICS)
                             else "left", overflow="fold")
        styles = {"FINISHED": "", "SKIPPED": "dim", "FAILED": "red", "KILLED": "yellow"}
        for rec in records:
            table.add_row(*[escape(rec[c] if c != "run" else rec[c][:8]) for c in columns],
                          style=styles.get(rec["status"], ""))
        return table

    def errors(self) -> List[str]:
        """One line per failed job, printed under the table."""
        return [f"job {rec['job']} {rec['status']}: {rec['error']}" for rec in self.records() if rec["error"]]

    def write_files(self) -> List[Path]:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.sweep_dir / "sweep_summary.csv"
        md_path = self.sweep_dir / "sweep_summary.md"
        csv_path.write_text(self.csv())
        md_path.write_text(self.markdown() + "\n")
        return [csv_path, md_path]


def build(state: SweepState, records: List[JobRecord], sweep_dir: Path) -> Summary:
    rows = [Row(r.num, list(r.overrides), r.status, r.objective, r.run_id, r.error, dict(r.metrics))
            for r in records]
    if state.parent_run_id:
        _complete_from_mlflow(state, rows, sweep_dir)
    return Summary(state, sorted(rows, key=lambda r: r.num), sweep_dir)


def _complete_from_mlflow(state: SweepState, rows: List[Row], sweep_dir: Path) -> None:
    from cnnrun.sweep.job import DIR_TAG, JOB_TAG
    from cnnrun.tracking import connect

    try:
        client = connect(state.tracking_uri)
        experiment = client.get_experiment_by_name(state.experiment)
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{state.parent_run_id}'",
            max_results=5000,
        )
        by_id = {run.info.run_id: run for run in children}
        known = {row.num for row in rows}
        for run in children:  # a job stopped before it could write its record (Ctrl-C, a killed worker)
            tags = run.data.tags
            if tags.get(DIR_TAG) != str(sweep_dir) or not tags.get(JOB_TAG, "").isdigit():
                continue
            num = int(tags[JOB_TAG])
            if num in known:
                continue
            known.add(num)
            status = run.info.status if run.info.status != "RUNNING" else "KILLED"
            rows.append(Row(num, tags.get("cnnrun.sweep.job_overrides", "").split(), status,
                            run.data.metrics.get(state.objective), run.info.run_id, tags.get("cnnrun.error")))
        for row in rows:
            run = by_id.get(row.run_id) if row.run_id else None
            if run is None and row.run_id and row.status == "SKIPPED":
                run = client.get_run(row.run_id)
            if run is not None:
                row.metrics.update({k: v for k, v in run.data.metrics.items() if k in SHOWN_METRICS})
    except Exception:  # the records alone still make a summary
        return


def one_line(text: str, limit: int = 300) -> str:
    """A multi-line error (a config error lists its problems on separate lines) as one line for a table cell."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"
