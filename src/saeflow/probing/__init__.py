"""Sparse probing: "Are Sparse Autoencoders Useful? A Case Study in Sparse Probing" (arXiv 2502.16681).

Stages: :mod:`.datasets` (the sae-probes wheel's bundled datasets), :mod:`.acts` (last-token model
activations), :mod:`.sae_acts` (sparse SAE activations), :mod:`.run` (baselines and SAE probes in
each regime, on the batched engine of :mod:`.engine` or the sklearn reference of :mod:`.reference`).
"""
