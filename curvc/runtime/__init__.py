"""What generated modules import: the torch.optim bookkeeping, written once."""
from curvc.runtime.optimizer import Bucket, CurvOptimizer

__all__ = ["Bucket", "CurvOptimizer"]
