"""Evaluation of trained parts (held-out denoising loss; FID and friends come later)."""
