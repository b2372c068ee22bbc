"""Typed, frozen configuration: one dataclass per ``params.yaml`` section, one module per stage's sections.

Config flows one way: a params section (or CLI flags) -> ``base.load_section`` -> a frozen
dataclass validated in ``__post_init__`` -> plain functions. Defaults live in the dataclasses and
nowhere else; ``params.yaml`` states the same values. Each DVC stage imports only the modules of
the sections it reads, so that a new training field never invalidates the cache stage. This
package file imports nothing on purpose.
"""
