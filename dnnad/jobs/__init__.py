"""The jobs: each fills in the one skeleton (``base.Job``) with only what is its own."""
from .audit import AuditJob
from .rank import RankJob
from .score import ScoreJob

JOBS = {"score": ScoreJob, "rank": RankJob, "audit": AuditJob}

__all__ = ["JOBS", "AuditJob", "RankJob", "ScoreJob"]
