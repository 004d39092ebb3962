"""The search's objectives. To add one: a Scorer subclass in a new file here, exported below, and
an entry in `module.scorers` (see docs/architecture.md)."""

from abliterate.scorers.base import Direction, Observations, Scorer
from abliterate.scorers.capability import Capability
from abliterate.scorers.defaults import default_scorers
from abliterate.scorers.degeneration import Degeneration
from abliterate.scorers.judge import JudgeRefusals
from abliterate.scorers.kl import KL
from abliterate.scorers.probe import ProbeRefusals
from abliterate.scorers.refusals import MarkerRefusals
from abliterate.scorers.thinking import ThinkingRefusals

__all__ = [
    "KL",
    "Capability",
    "Degeneration",
    "Direction",
    "JudgeRefusals",
    "MarkerRefusals",
    "Observations",
    "ProbeRefusals",
    "Scorer",
    "ThinkingRefusals",
    "default_scorers",
]
