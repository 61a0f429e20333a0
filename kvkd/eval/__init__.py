"""kvkd.eval."""
