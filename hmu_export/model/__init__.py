from .weights import build_model, load_checkpoint, save_checkpoint
from .hmu import HMU, IdentityHMU, TokenVAE
from .transformer import DiagnosticsWrapper, HMUTransformer

__all__ = ["HMU", "IdentityHMU", "TokenVAE", "HMUTransformer", "DiagnosticsWrapper",
           "build_model", "load_checkpoint", "save_checkpoint"]
