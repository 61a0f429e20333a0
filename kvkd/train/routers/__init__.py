"""kvkd.train.routers."""
