"""spikequant: post-training quantization of LLaMA-family language models.

Two methods against activation spikes live here: spike-aware mixed precision and Hadamard
rotations with clip-ratio search and dimension expansion. See README.md for the tour.
"""

__version__ = "0.1.0"
