"""The run report: one self-contained HTML page per run, built from bounded reads of the output."""

from pipeline.report.build import Report, build_report, save_report
from pipeline.report.sample import SampleLimits

__all__ = ["Report", "SampleLimits", "build_report", "save_report"]
