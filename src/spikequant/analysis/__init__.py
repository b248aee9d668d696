"""Analysis: where the activation spikes are, detection rules, tables, plots and recipe comparisons."""

from spikequant.analysis.analyze import SpikeAnalysis, analyze, write_analysis
from spikequant.stats import LinearStats, SpikeRule, TokenHit, collect_stats

__all__ = ["LinearStats", "SpikeAnalysis", "SpikeRule", "TokenHit", "analyze", "collect_stats", "write_analysis"]
