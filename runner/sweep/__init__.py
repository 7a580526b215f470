"""Parameter sweeps: the parameter space, constraints, objectives, and the chunk runner.

Modules:

- :mod:`runner.sweep.space` declares a parameter space (grid ranges, value lists, random
  distributions), parses the command line's ``name=start:stop[:step]`` forms, enumerates
  grids and checks a space against a strategy's params struct;
- :mod:`runner.sweep.constraint` parses constraint expressions (``fast < slow``) against a
  whitelist and evaluates them without ``eval``;
- :mod:`runner.sweep.objective` parses ``maximize`` (``-name`` minimises) and ranks
  results with undefined values last;
- :mod:`runner.sweep.chunk` runs a list of combinations on bars loaded once (the work of
  the ``sweep_chunk`` op, :mod:`runner.ops.sweep_chunk`).

Everything but :mod:`runner.sweep.chunk` imports only msgspec and the standard library, so
the dispatcher can validate a sweep without numpy.
"""
