"""kvkd.pipeline."""
