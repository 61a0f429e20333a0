"""Child of test_deepspeed_nonfinite.py (run under torchrun): train with a planted fault and
write the DeepSpeed engine's counters. argv[1]: JSON of TrainConfig options plus ``fault``
(see :func:`plant`) and ``counters`` (a path)."""

import json
import sys

from kvkd.train import trainer


def plant(fault: dict) -> None:
    """Make ``trainer.build_trainee`` return a trainee with a fault: ``{"kind": "grad", "call": n}``
    multiplies the n-th gradient of the CODI projection's weight by inf (a finite loss with an
    inf/NaN gradient); ``{"kind": "loss", "call": n}`` makes the n-th forward's loss NaN."""
    real = trainer.build_trainee

    def build(cfg, metas):
        t = real(cfg, metas)
        calls = {"n": 0}
        if fault["kind"] == "grad":
            name, p = next((n, p) for n, p in t.named_parameters() if p.requires_grad and "projection" in n)

            def hook(g):
                calls["n"] += 1
                return g * float("inf") if calls["n"] == fault["call"] else g

            p.register_hook(hook)
        else:
            forward = t.forward

            def nan_forward(*args, **kwargs):
                calls["n"] += 1
                loss, part = forward(*args, **kwargs)
                return (loss * float("nan") if calls["n"] == fault["call"] else loss), part

            t.forward = nan_forward
        return t

    trainer.build_trainee = build


if __name__ == "__main__":
    opts = json.loads(sys.argv[1])
    plant(opts.pop("fault"))
    counters = opts.pop("counters")
    engines = []
    real_engine = trainer.build_engine
    trainer.build_engine = lambda trainee, cfg: engines.append(real_engine(trainee, cfg)) or engines[-1]
    trainer.train(trainer.TrainConfig(**opts))
    ds = engines[0].engine
    if ds.global_rank == 0:
        with open(counters, "w") as f:
            json.dump({"micro_steps": ds.micro_steps, "global_steps": ds.global_steps}, f)
