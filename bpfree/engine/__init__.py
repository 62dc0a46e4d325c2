"""The engine: one training loop (`loop.Trainer`), the stage protocol's batch order (`batch`),
communicators for one process or a pipeline of ranks (`comm`), stage placement (`placement`) and
process start-up (`launch`)."""
from .comm import LocalComm, PipelineComm, RankFailed
from .loop import DivergedError, Phase, Trainer, plan_phases

__all__ = ["DivergedError", "LocalComm", "Phase", "PipelineComm", "RankFailed", "Trainer", "plan_phases"]
