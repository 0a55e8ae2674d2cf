"""Import published SimCLRv2 weights: TensorFlow checkpoints read without TensorFlow.

``TFCheckpoint`` lists and reads the variables of a TF1 or TF2 checkpoint from a local
path or any URL ``shards.storage`` opens.
"""

from .tf_checkpoint import TFCheckpoint, Variable, resolve_prefix

__all__ = ["TFCheckpoint", "Variable", "resolve_prefix"]
