"""inception_flax: the Inception family of image classifiers in JAX / Flax.

Importing any module of this package changes no process state. Entry points call
`inception_flax.cpu.process.prepare()` first (see there).
"""
