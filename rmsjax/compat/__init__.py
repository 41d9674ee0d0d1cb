"""Exact presets of other frameworks' optimizers: ``pytorch`` (torch.optim 2.x), ``keras``
(Keras 3), ``tf1`` (TensorFlow 1's RMSPropOptimizer), and the low-bit optimizers of
``bitsandbytes`` (0.50: ``Adam8bit``, ``AdamW8bit``, ``RMSprop8bit``) and ``torchao`` (0.18:
``AdamW8bit``, ``AdamW4bit``; tests against the libraries' runs in
``tests/test_lowbit_presets.py``).

Each preset takes the framework's own argument names and defaults and returns an optax-protocol
transformation that, fed the same gradients, follows the framework's parameter trajectory
(float64 to ~1e-12, float32 to float32 rounding). See ``docs/conventions.md`` for the update
equations side by side, and ``tests/test_compat.py`` for the proof against stored trajectories of
the real frameworks.

    import rmsjax.compat.pytorch as torch_optim
    opt = torch_optim.rmsprop(lr=1e-2, momentum=0.9)   # torch.optim.RMSprop(params, lr=1e-2, ...)
"""

from rmsjax.compat import bitsandbytes, keras, pytorch, tf1, torchao

__all__ = ["bitsandbytes", "keras", "pytorch", "tf1", "torchao"]
