"""medssl-monai: self-supervised pretraining for medical imaging on MONAI."""
__version__ = "0.1.0"
