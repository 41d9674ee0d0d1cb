"""The native kernel's operands, defined once for Python and C++.

One row per kernel *kind* (a family of loops in ``fused_step.cc``): its id, the names of its
float32 scalars in operand order, its per-parameter state slots in operand order (each the name
of the state field it reads and writes, and the flag that makes it present), and its static
flags. Nothing else defines the boundary:

* the Python side (:mod:`rmsjax._native.call`) builds the operands from it: the scalar vector in
  the order of :attr:`Kind.scalars`, the slots of :func:`present_slots`, the flags as the bit
  mask of :func:`flag_bits`, and :data:`TABLE_HASH`;
* the build recipe (:mod:`rmsjax._native.build`) writes :func:`cpp_header` next to the kernel
  source before compiling, so the C++ loops read each scalar and slot by a generated name
  (``rms::kEps``, ``rms::kNu``), and the kernel checks the kind, the flag bits, the exact scalar
  count, the exact operand count and the table hash of every call, returning an FFI error
  instead of computing with misplaced operands;
* the header (hence :data:`TABLE_HASH`) is part of the library's source id, so a library built
  from another version of this table is recognised as stale and not loaded.

Standard library only (no jax): ``setup.py`` loads the recipe, and the recipe this file, by path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import NamedTuple

__all__ = [
    "CODEC_FIELDS",
    "DECAY_FLAGS",
    "CODEC_MAGIC",
    "CODEC_SECTIONS",
    "KINDS",
    "MAP_SIZE",
    "MAX_BLOCK",
    "STORAGE_FLAGS",
    "TABLE_HASH",
    "VERSION",
    "CodecSection",
    "Kind",
    "Slot",
    "OPTIONAL_FLAGS",
    "codec_spans",
    "complete_flags",
    "cpp_header",
    "flag_bits",
    "kind",
    "present_slots",
]

# Bump when the meaning of an operand changes without its name changing.
VERSION = 3

# Flags every kind has besides its own (appended to ``Kind.flags``): how the leaves of one call
# are stored. ``bf16``: parameters and gradients are bfloat16 (the state float32 or ``q8``),
# rounded where the pure-JAX chain rounds. ``q8``: every state slot is 8-bit block-quantized
# (``rmsjax.quantized(bits=8)`` with rmsjax's own codec): per leaf and slot two operands, the
# uint8 codes (the parameter's shape) and the float32 scales (one per block along the last
# axis), and per call one codec operand per present slot (see ``CODEC_SECTIONS``).
STORAGE_FLAGS: tuple[str, ...] = ("bf16", "q8")

# Flags some kinds have for the linear terms the framework presets put around a rule (each a
# stage of the recorded chain, see rmsjax.fused.plans), in the order the step applies them:
#   maximize         the gradient is negated first (a leading ``scale(-1)``: PyTorch's
#                    ``maximize``);
#   coupled_decay    ``g + weight_decay * p`` before the rule (``add_decayed_weights`` before it:
#                    PyTorch's ``weight_decay`` of RMSprop, Adam and SGD);
#   weight_decay     ``u + weight_decay * p`` after the rule, before the step size
#                    (``add_decayed_weights`` after it: optax's AdamW; adam only);
#   decoupled_decay  ``u - weight_decay * p`` after the step size and the momentum buffer
#                    (``decoupled_weight_decay`` last: PyTorch's AdamW, every Keras optimizer's
#                    ``weight_decay``);
#   decay_bf16       with bf16, the decay product is a bfloat16 multiplication (the chain's
#                    coefficient is a weakly typed Python number), not a float32 one.
# ``weight_decay`` (the scalar) is the coefficient of whichever decay term is present; a call
# has at most one (EXCLUSIVE).
DECAY_FLAGS: tuple[str, ...] = ("coupled_decay", "weight_decay", "decoupled_decay")

# An 8-bit codec operand: one flat uint8 array per present slot and call, built by
# ``rmsjax._native.codecs.operand`` and read back by ``codecs.parse`` and by ``ParseCodec`` in
# fused_step.cc. Its layout is CODEC_SECTIONS below (byte offsets: ``codec_spans``); nothing else
# describes it. The header fields:
#   magic       CODEC_MAGIC
#   block_size  entries per scale (1 .. MAX_BLOCK)
#   lo_bits     the float32 bits of a power of two at or below the smallest breakpoint magnitude
#   shift       0 .. 23: each cell holds 2**shift consecutive float32 magnitudes
#   half        the cells per sign: ((bits of 1.0 - lo_bits) >> shift) + 1
#   cells       the cell table's entries: 2 * half
# The code of a normalised value v (|v| <= 1) is #(breakpoints <= v). The cell table finds it
# with one read and one comparison: the float32 magnitudes of [0, 1] are cut, by their bit
# patterns, into cells of 2**shift consecutive magnitudes from ``lo_bits`` up (smaller magnitudes
# join the first cell), each holding at most one breakpoint; cell ``half + k`` holds the
# positive magnitudes of range k, cell ``half - 1 - k`` the negative ones; the table holds, per
# cell, the number of breakpoints below it, and ``points[base] <= v`` adds the one inside.
CODEC_MAGIC = 0x38435152  # "RQC8"
CODEC_FIELDS: tuple[str, ...] = ("magic", "block_size", "lo_bits", "shift", "half", "cells")
MAP_SIZE = 256


class CodecSection(NamedTuple):
    """One section of a codec operand: its name, its element type (little-endian) and its
    number of entries (a number, or the name of the header field that holds it)."""

    name: str
    dtype: str  # "int32", "float32" or "uint8"
    entries: int | str


CODEC_SECTIONS: tuple[CodecSection, ...] = (
    CodecSection("fields", "int32", len(CODEC_FIELDS)),  # CODEC_FIELDS, in order
    CodecSection("qmap", "float32", MAP_SIZE),  # the codec's map, code -> value
    CodecSection("points", "float32", MAP_SIZE),  # the breakpoints, ascending, +inf padded
    CodecSection("cells", "uint8", "cells"),  # the cell table
    CodecSection("padding", "uint8", 3),  # zeros: the kernel may read 4 bytes at the last cell
)
_ITEMSIZE = {"int32": 4, "float32": 4, "uint8": 1}


def codec_spans(fields: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """The byte range ``(start, stop)`` of each section of :data:`CODEC_SECTIONS` in a codec
    operand whose header holds ``fields`` (by name); the last stop is the operand's size."""
    spans: dict[str, tuple[int, int]] = {}
    at = 0
    for section in CODEC_SECTIONS:
        count = section.entries
        if isinstance(count, str):
            count = int(fields[count])
        spans[section.name] = (at, at + count * _ITEMSIZE[section.dtype])
        at = spans[section.name][1]
    return spans


# The largest block (entries per scale) the kernel takes: a block's new moments are kept on
# the stack between the update and the requantisation.
MAX_BLOCK = 4096


class Slot(NamedTuple):
    """A per-parameter state array of a kind: the state field it is, and when it is present."""

    name: str  # the state field (``nu``, ``mu``, ``trace``) the slot reads and writes
    when: str | None  # the flag that makes the slot present; None: always present


class Kind(NamedTuple):
    """One family of kernel loops and its operands."""

    name: str
    id: int
    scalars: tuple[str, ...]  # float32 scalar operand, in order
    slots: tuple[Slot, ...]  # per-leaf state operands, in order (absent ones skipped)
    flags: tuple[str, ...]  # static flags; flag i is bit 1 << i of the ``flags`` attribute
    # groups of flags of which a call sets at most one
    exclusive: tuple[tuple[str, ...], ...] = ()


KINDS: tuple[Kind, ...] = (
    # rmsjax.rmsprop and the presets' RMSprop: [maximize], [coupled decay],
    # scale_by_rms / scale_by_centered_rms, then scale_by_learning_rate and [trace] in either
    # order (scale_first: the step size inside the momentum buffer, as optax, Keras and TF1;
    # else after it, as PyTorch), [decoupled decay].
    Kind(
        name="rms",
        id=0,
        scalars=(
            "one_minus_decay",
            "decay",
            "eps",
            "correction",
            "step_size",
            "momentum",
            "weight_decay",
        ),
        slots=(Slot("mu", "centered"), Slot("nu", None), Slot("trace", "momentum")),
        flags=(
            "centered",
            "eps_in_sqrt",
            "momentum",
            "nesterov",
            "scale_first",
            "maximize",
            "coupled_decay",
            "decoupled_decay",
            "decay_bf16",
            *STORAGE_FLAGS,
        ),
        # no preset combines Nesterov momentum with the terms around the rule: the kernel has
        # no loop for it (each would cost compile time), such a chain runs pure JAX
        exclusive=(
            ("coupled_decay", "decoupled_decay"),
            ("nesterov", "maximize"),
            ("nesterov", "coupled_decay"),
            ("nesterov", "decoupled_decay"),
        ),
    ),
    # rmsjax.adam / rmsjax.adamw and the presets' Adam and AdamW: [maximize], [coupled decay],
    # scale_by_adam (eps_hat: scale_by_adam_eps_hat, Keras' form), [weight decay],
    # scale_by_learning_rate, [decoupled decay].
    Kind(
        name="adam",
        id=1,
        scalars=(
            "one_minus_b1",
            "b1",
            "one_minus_b2",
            "b2",
            "eps",
            "eps_root",
            "c1",
            "c2",
            "c1_next",
            "alpha",
            "step_size",
            "weight_decay",
        ),
        slots=(Slot("mu", None), Slot("nu", None)),
        flags=(
            "nesterov",
            "eps_hat",
            "maximize",
            "coupled_decay",
            "weight_decay",
            "decoupled_decay",
            "decay_bf16",
            *STORAGE_FLAGS,
        ),
        exclusive=(
            ("nesterov", "eps_hat"),
            DECAY_FLAGS,
            ("nesterov", "maximize"),
            ("nesterov", "coupled_decay"),
            ("nesterov", "decoupled_decay"),
        ),
    ),
    # rmsjax.sgd and the presets' SGD: [maximize], [coupled decay], [trace] and
    # scale_by_learning_rate in either order (scale_first: Keras' learning rate inside the
    # buffer), [decoupled decay].
    Kind(
        name="sgd",
        id=2,
        scalars=("step_size", "momentum", "weight_decay"),
        slots=(Slot("trace", "momentum"),),
        flags=(
            "momentum",
            "nesterov",
            "scale_first",
            "maximize",
            "coupled_decay",
            "decoupled_decay",
            "decay_bf16",
            *STORAGE_FLAGS,
        ),
        exclusive=(("coupled_decay", "decoupled_decay"),),
    ),
)


def _digest() -> str:
    layout = (
        STORAGE_FLAGS,
        DECAY_FLAGS,
        CODEC_MAGIC,
        CODEC_FIELDS,
        CODEC_SECTIONS,
        MAP_SIZE,
        MAX_BLOCK,
    )
    return hashlib.sha256(repr((VERSION, KINDS, layout)).encode()).hexdigest()


# 60 bits of a hash of the whole table: an int64 kernel attribute, and a constant in the header.
TABLE_HASH: int = int(_digest()[:15], 16)


def kind(name: str) -> Kind:
    """The row called ``name``; ``KeyError`` naming the known kinds otherwise."""
    for row in KINDS:
        if row.name == name:
            return row
    raise KeyError(f"no kernel kind {name!r}; the table has {[k.name for k in KINDS]}")


# Flags that may be left out of a flag mapping (then false): the storage flags, the linear terms
# around the rule, and flags that only matter with one of them.
OPTIONAL_FLAGS: tuple[str, ...] = (*STORAGE_FLAGS, *DECAY_FLAGS, "maximize", "decay_bf16")


def complete_flags(row: Kind, flags: Mapping[str, bool]) -> dict[str, bool]:
    """Every flag of ``row``, ``flags``' values (the optional flags it leaves out false).

    Raises ``ValueError`` when ``flags`` has a name the kind lacks, misses a required one, or
    sets more than one flag of a group of :attr:`Kind.exclusive`.
    """
    required = {f for f in row.flags if f not in OPTIONAL_FLAGS}
    if not required <= set(flags) <= set(row.flags):
        raise ValueError(
            f"kernel kind {row.name!r} takes exactly the flags {list(row.flags)} (of which "
            f"{[f for f in row.flags if f in OPTIONAL_FLAGS]} may be left out), got "
            f"{sorted(flags)}"
        )
    full = {f: bool(flags.get(f, False)) for f in row.flags}
    for group in row.exclusive:
        if sum(full[f] for f in group) > 1:
            raise ValueError(
                f"kernel kind {row.name!r} takes at most one of the flags {list(group)}, got "
                f"{[f for f in group if full[f]]}"
            )
    return full


def present_slots(row: Kind, flags: Mapping[str, bool]) -> tuple[str, ...]:
    """The names of the slots present with these flags, in operand order."""
    full = complete_flags(row, flags)
    return tuple(s.name for s in row.slots if s.when is None or full[s.when])


def flag_bits(row: Kind, flags: Mapping[str, bool]) -> int:
    """The ``flags`` attribute: bit ``i`` set when flag ``row.flags[i]`` is true."""
    full = complete_flags(row, flags)
    return sum(1 << i for i, name in enumerate(row.flags) if full[name])


def _camel(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def _codec_section_lines() -> list[str]:
    """Per section of :data:`CODEC_SECTIONS`: its byte offset while that is fixed (no section
    of a variable count before it) and its number of entries where that is fixed."""
    lines: list[str] = []
    at: int | None = 0
    for section in CODEC_SECTIONS:
        name = _camel(section.name)
        if at is not None:
            lines.append(f"constexpr size_t {name}Offset = {at};")
        if isinstance(section.entries, int):
            lines.append(f"constexpr size_t {name}Count = {section.entries};")
            at = None if at is None else at + section.entries * _ITEMSIZE[section.dtype]
        else:
            lines.append(f"// {name}Count: the header field {section.entries!r}")
            at = None
    return lines


def cpp_header() -> str:
    """The C++ header ``rmsjax_kernel_table.h`` that the kernel source includes.

    Per kind, in ``namespace rmsjax_table::<kind>``: ``kId``; the scalar indices
    ``scalar::kEps, ...`` and their number ``scalar::kCount``; the slot indices ``slot::kNu, ...``
    and ``slot::kCount``; the flag bits ``flag::kCentered, ...`` and their union ``flag::kAll``;
    ``kSlotNeeds`` (the flag bit each slot needs, 0 = always present), ``kExclusive`` (per
    group of :attr:`Kind.exclusive`, the mask of its flags). Then ``kKinds`` (a ``KindInfo``
    per kind id), ``kMaxSlots``, ``kMaxScalars``, ``kNumKinds`` and ``kTableHash``, and in
    ``namespace codec`` the codec operand's layout (``kMagic``, ``field::kBlockSize, ...``,
    ``kMapSize``, ``kMaxBlock``, and per section ``kQmapOffset``, ``kQmapCount``, ...).
    """
    ids = [row.id for row in KINDS]
    if ids != list(range(len(KINDS))):
        raise ValueError(f"kind ids must be 0, 1, 2, ... in table order, got {ids}")
    lines = [
        "// Generated by rmsjax/_native/build.py from rmsjax/_native/table.py: do not edit.",
        "#pragma once",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        "namespace rmsjax_table {",
        "",
        f"constexpr int64_t kTableHash = 0x{TABLE_HASH:015x};",
        f"constexpr int kMaxSlots = {max(len(row.slots) for row in KINDS)};",
        f"constexpr int kMaxScalars = {max(len(row.scalars) for row in KINDS)};",
        f"constexpr int kNumKinds = {len(KINDS)};",
        "",
        "// 8-bit codec operands (CODEC_SECTIONS in table.py)",
        "namespace codec {",
        f"constexpr int32_t kMagic = 0x{CODEC_MAGIC:08x};",
        f"namespace field {{ enum : int {{ "
        f"{', '.join(f'{_camel(n)} = {i}' for i, n in enumerate(CODEC_FIELDS))}, "
        f"kCount = {len(CODEC_FIELDS)} }}; }}",
        f"constexpr int kMapSize = {MAP_SIZE};",
        f"constexpr int kMaxBlock = {MAX_BLOCK};",
        *_codec_section_lines(),
        "}  // namespace codec",
        "",
    ]
    for row in KINDS:
        scalars = [f"{_camel(n)} = {i}" for i, n in enumerate(row.scalars)]
        slots = [f"{_camel(s.name)} = {i}" for i, s in enumerate(row.slots)]
        flags = [f"{_camel(n)} = {1 << i}" for i, n in enumerate(row.flags)]
        needs = ["0" if s.when is None else str(1 << row.flags.index(s.when)) for s in row.slots]
        exclusive = [str(sum(1 << row.flags.index(f) for f in g)) for g in row.exclusive]
        lines += [
            f"namespace {row.name} {{",
            f"constexpr int64_t kId = {row.id};",
            f"namespace scalar {{ enum : int {{ {', '.join(scalars)}, "
            f"kCount = {len(scalars)} }}; }}",
            f"namespace slot {{ enum : int {{ {', '.join(slots)}, kCount = {len(slots)} }}; }}",
            f"namespace flag {{ enum : int64_t {{ {', '.join(flags)}, "
            f"kAll = {(1 << len(flags)) - 1} }}; }}",
            "// the flag bit each slot needs to be present (0: always present)",
            f"constexpr int64_t kSlotNeeds[slot::kCount] = {{{', '.join(needs)}}};",
            "// groups of flags of which a call sets at most one (as bit masks)",
            f"constexpr int64_t kExclusive[] = {{{', '.join(exclusive) or '0'}}};",
            f"}}  // namespace {row.name}",
            "",
        ]
    lines += [
        "struct KindInfo {",
        "  const char* name;",
        "  int num_scalars;",
        "  int num_slots;",
        "  int64_t all_flags;",
        "  const int64_t* slot_needs;",
        "  const int64_t* exclusive;",
        "  int num_exclusive;",
        "};",
        "",
        "constexpr KindInfo kKinds[kNumKinds] = {",
        *(
            f'    {{"{r.name}", {r.name}::scalar::kCount, {r.name}::slot::kCount, '
            f"{r.name}::flag::kAll, {r.name}::kSlotNeeds, {r.name}::kExclusive, "
            f"{len(r.exclusive)}}},"
            for r in KINDS
        ),
        "};",
        "",
        "}  // namespace rmsjax_table",
        "",
    ]
    return "\n".join(lines)
