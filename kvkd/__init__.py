"""kvkd: multi-teacher KV-cache knowledge distillation of LLM reasoning.

Data flows one way: ``pipeline -> cache -> train -> eval``. Teachers run once, offline
(``kvkd extract``); their compressed KV caches are streamed while a latent (CODI/KaVa)
student trains (``kvkd train``); ``kvkd eval`` scores the student.
"""

__version__ = "0.1.0"
