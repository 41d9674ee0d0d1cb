"""The native CPU kernel and its whole interface: the source (``fused_step.cc``); the operand
table (:mod:`.table`, from which the build generates the C++ header the source includes); the
8-bit codec operands (:mod:`.codecs`); the FFI call (:mod:`.call`); the look-up, build and
registration of the library (:mod:`.loader`, public as :mod:`rmsjax.native`); the compile
recipe (:mod:`.build`); the contract table of the rules and guards the kernel implements
(:mod:`.contracts`); and, after ``pip install`` on a machine with a C++ compiler, the compiled
library (``_fused_step.so``)."""
