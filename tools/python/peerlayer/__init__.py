"""peerlayer: Python access to libpeer, the C implementation of the PEER layer
(product-key expert retrieval, docs/PEER.md).  The numpy binding is here;
the PyTorch module is peerlayer.nn.PEER (imported only when torch is used)."""

from .core import (Context, Grads, Layer, Optimizer, PeerError, convert_from_pytorch,
                   convert_to_pytorch, lib, usage_metrics, version)

__all__ = ["Context", "Grads", "Layer", "Optimizer", "PeerError", "convert_from_pytorch",
           "convert_to_pytorch", "lib", "usage_metrics", "version"]
