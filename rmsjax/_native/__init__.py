"""The native CPU kernel's source (``fused_step.cc``), its operand table (:mod:`.table`, from
which the build generates the C++ header the source includes), its compile recipe
(:mod:`.build`) and, after ``pip install`` on a machine with a C++ compiler, the compiled
library (``_fused_step.so``). Loading and status live in :mod:`.loader`, public as
:mod:`rmsjax.native`."""
