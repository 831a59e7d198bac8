"""Evaluation-only phantoms: anatomies that no training code may import (the unseen-anatomy split).

Why a separate package: a model is judged on whether it learned spin-echo physics or the
training anatomy.  That judgement needs data whose geometry *and* generator code the
training never saw, so these modules are written independently of
:mod:`rtcontrast.research.phantom`, :mod:`rtcontrast.research.random_phantom`,
:mod:`rtcontrast.research.abdomen_phantom` and :mod:`rtcontrast.research.tissue_prior` and import none of
them; ``tests/test_eval_isolation.py`` checks that the training modules import nothing
from here.
"""
