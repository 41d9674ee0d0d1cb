"""The native CPU kernel's source (``fused_step.cc``), its compile recipe (:mod:`.build`) and,
after ``pip install`` on a machine with a C++ compiler, the compiled library
(``_fused_step.so``). Loading and status live in :mod:`rmsjax.native`."""
