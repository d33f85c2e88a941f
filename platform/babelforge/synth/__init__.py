"""Persona-based synthesis of (query, positive, hard negative) examples (issue #3, stage 2).

See :mod:`babelforge.synth.stage` for the stage, ``docs/synth.md`` for the persona format, the
task types and the backends.
"""
