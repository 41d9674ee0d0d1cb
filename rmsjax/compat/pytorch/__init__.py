"""PyTorch presets: ``torch.optim`` optimizers and ``torch.optim.lr_scheduler`` schedulers.

* The optimizers (:mod:`rmsjax.compat.pytorch.optim`) are re-exported here, so
  ``rmsjax.compat.pytorch.rmsprop(lr=1e-2, momentum=0.9)`` is ``torch.optim.RMSprop``.
* :mod:`rmsjax.compat.pytorch.lr_scheduler` holds torch's learning-rate schedulers as optax
  schedules (``StepLR(0.1, step_size=30)``) and ``ReduceLROnPlateau`` as a transformation.

    import rmsjax.compat.pytorch as torch_optim
    from rmsjax.compat.pytorch import lr_scheduler as lr_scheduler

    opt = torch_optim.sgd(lr=lr_scheduler.StepLR(0.1, step_size=30), momentum=0.9)
"""

from rmsjax.compat.pytorch import lr_scheduler as lr_scheduler
from rmsjax.compat.pytorch.optim import adadelta, adagrad, adam, adamw, rmsprop, rprop, sgd

# The optimizer presets (``lr_scheduler`` is a submodule, imported above).
__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "rprop", "sgd"]
