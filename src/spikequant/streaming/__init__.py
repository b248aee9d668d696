"""Models larger than memory: quantize and evaluate one decoder layer at a time, read from and written
to safetensors shards (see docs/scale.md)."""

from spikequant.streaming.checkpoint import StreamedModel, peak_rss_bytes
from spikequant.streaming.evaluate import evaluate_streamed, logprobs_streamed, open_saved
from spikequant.streaming.quantize import StreamingError, check_streamable, quantize_streamed, save_streamed

__all__ = ["StreamedModel", "StreamingError", "check_streamable", "evaluate_streamed", "logprobs_streamed",
           "open_saved", "peak_rss_bytes", "quantize_streamed", "save_streamed"]
