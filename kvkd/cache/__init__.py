"""kvkd.cache."""
