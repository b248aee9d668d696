"""Analysis: where the activation spikes are, detection rules, tables and plots."""

from spikequant.analysis.spikes import LinearStats, SpikeRule, collect_stats

__all__ = ["LinearStats", "SpikeRule", "collect_stats"]
