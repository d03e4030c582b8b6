"""The 3D-aware regulariser (Li, McDonagh, Leonardis and Bilen, "Multi-task Learning with 3D-Aware
Regularization", ICLR 2024): `config.py` (its options), `rendering.py` (rays, tri-plane sampling,
volume rendering) and `model.py` (`ThreeDAwareModel`, the training-time wrapper).

This file imports nothing, so that `mtvision/models/config.py` can import the options without a cycle.
"""
