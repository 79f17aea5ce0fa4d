"""One pipeline per task; the task specs (kiln.runtime.tasks) say which serves which task."""

from kiln.runtime.pipelines.base import Pipeline, Prepared, Runner, SessionRunner

__all__ = ["Pipeline", "Prepared", "Runner", "SessionRunner"]
