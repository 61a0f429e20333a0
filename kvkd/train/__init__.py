"""kvkd.train."""
