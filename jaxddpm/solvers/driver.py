"""The one sampling loop of every solver: a chunked `lax.scan` over a plan of operations.

A `Plan` is a solver and a static list of operations, padded to a whole number of chunks:

- OP_STEP: the solver's step i (grid point i -> i + 1);
- OP_SKIP: padding, the state passes through unchanged;
- extra operations a plan-level wrapper brings, codes OP_STEP + 1, ... (RePaint's renoising,
  `jaxddpm.solvers.repaint`).

A chunk is `chunk_length` operations whose start index is a traced argument, so a caller (a
progress bar in the shell) runs the plan piece by piece with one compilation:

  plan = make_plan(make_solver(schedule, 'ddim', num_steps=50))
  state = plan.init(key, (16, 32, 32, 3))
  run = jax.jit(run_chunk)  # model_fn a `Partial`, or pass static_argnums=1
  for start in plan.chunk_starts:
    state, _ = run(plan, model_fn, state, start)
  images = state.x

or all at once with `sample`. Only the solver's state is carried, so memory is flat in the
number of steps, unless `intermediate_every` asks for x after every k-th operation.

Randomness: the key in the state is never split along the way; operation k draws from
fold_in(key, k), so results do not depend on the chunking, and with a fixed key they are
bitwise reproducible. On a sharded batch the values do not depend on the number of devices
(threefry is partitionable).

`model_fn(x, t, cond) -> [B, ...]` (twice the channels for learned variances). Pass it as a
`jax.tree_util.Partial` over the parameters (e.g. `models.make_model_fn`) so that under jit
the parameters are arguments, not constants baked into the program; plain functions work too.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm.solvers import base

OP_SKIP = 0
OP_STEP = 1


@flax.struct.dataclass
class State:
  """What the plan carries between chunks.

  solver: the solver's state (`state.solver.x` is the current sample).
  key: PRNG key; operation k uses fold_in(key, k).
  cond: the conditioning pytree passed to the model, arrays with leading dim B
    ({'label': [B]}; {} when unconditional).
  """
  solver: Any
  key: jax.Array
  cond: dict[str, jax.Array]

  @property
  def x(self) -> jax.Array:
    """[B, ...] float32, the current sample (x_T at the start, x_0 at the end)."""
    return self.solver.x


@flax.struct.dataclass
class Plan:
  """A solver and its operations. Build with `make_plan` (or `repaint.make_plan`).

  solver: a solver (`base.Solver`), possibly wrapped.
  index: int32 [K_pad], operation k's step index (or an extra operation's grid point).
  ops: int32 [K_pad], operation codes (OP_SKIP as padding at the end).
  num_ops: K, the operations before the padding.
  extra_ops: the functions of codes OP_STEP + 1, ...: f(solver, solver_state, index, key).
  """
  solver: Any
  index: jax.Array
  ops: jax.Array
  num_ops: int = flax.struct.field(pytree_node=False)
  chunk_length: int = flax.struct.field(pytree_node=False)
  intermediate_every: int = flax.struct.field(pytree_node=False)
  extra_ops: tuple[Callable, ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def num_chunks(self) -> int:
    return self.index.shape[0] // self.chunk_length

  @property
  def chunk_starts(self) -> range:
    """The `start` arguments of `run_chunk`, in order."""
    return range(0, self.index.shape[0], self.chunk_length)

  def init(self, key, shape=None, *, x_T=None, cond=None) -> State:
    """The state before the first operation.

    Args:
      key: PRNG key; x_T ~ N(0, I) is drawn from split(key)[0] unless given, and the solver's
        init gets that same half.
      shape: (B, ...) of the samples, when x_T is not given.
      x_T: [B, ...] the starting noise (e.g. to test that DDIM(eta=0) is deterministic).
      cond: the conditioning pytree of [B, ...] arrays passed to the model at every step.
    """
    init_key, key = jax.random.split(key)
    if x_T is None:
      if shape is None:
        raise ValueError('init needs shape or x_T')
      x_T = jax.random.normal(init_key, shape, jnp.float32)
    x = jnp.asarray(x_T, jnp.float32)
    return State(solver=self.solver.init(x, init_key), key=key, cond=dict(cond or {}))


def make_plan(solver, operations: tuple[np.ndarray, np.ndarray] | None = None, *,
              extra_ops: tuple[Callable, ...] = (), num_chunks: int = 10,
              chunk_length: int | None = None, intermediate_every: int = 0) -> Plan:
  """The plan that runs `solver`, in chunks. Host-side (the arguments are static).

  Args:
    solver: a solver (`base.Solver`).
    operations: (index, codes), int arrays [K]; default: steps 0, 1, ..., N - 1.
    extra_ops: the functions of the codes above OP_STEP (see `Plan`).
    num_chunks: the plan is split into about this many equal chunks (for progress).
    chunk_length: or give the chunk length directly.
    intermediate_every: 0 keeps no trajectory; k > 0 makes `run_chunk` also return x after
      every k-th operation (chunk_length is rounded up to a multiple of k).
  """
  if intermediate_every < 0:
    raise ValueError(f'intermediate_every must be >= 0, got {intermediate_every}')
  if operations is None:
    num_steps = solver.grid.num_steps
    operations = (np.arange(num_steps), np.full(num_steps, OP_STEP))
  index, codes = (np.asarray(a, np.int32) for a in operations)
  num_ops = index.shape[0]
  if chunk_length is None:
    chunk_length = math.ceil(num_ops / max(1, min(num_chunks, num_ops)))
  if intermediate_every:
    chunk_length = math.ceil(chunk_length / intermediate_every) * intermediate_every
  pad = math.ceil(num_ops / chunk_length) * chunk_length - num_ops
  index = np.concatenate([index, np.zeros(pad, np.int32)])
  codes = np.concatenate([codes, np.full(pad, OP_SKIP, np.int32)])
  return Plan(solver=solver, index=jnp.asarray(index), ops=jnp.asarray(codes),
              num_ops=num_ops, chunk_length=int(chunk_length),
              intermediate_every=int(intermediate_every), extra_ops=tuple(extra_ops))


def _operation(plan: Plan, model_fn, state: State) -> Callable:
  """scan body: operation k on the solver's state."""
  solver = plan.solver
  # Only steps (no extra operations, no padding): no lax.switch, whose branch XLA:CPU runs
  # some 5% slower than the same U-Net outside a conditional.
  only_steps = not plan.extra_ops and plan.num_ops == plan.index.shape[0]

  def op(s, k):
    key = jax.random.fold_in(state.key, k)
    i = plan.index[k]
    step = lambda: solver.step(model_fn, s, i, key, state.cond)
    if only_steps:
      return step(), None
    extra = [functools.partial(f, solver, s, i, key) for f in plan.extra_ops]
    return jax.lax.switch(plan.ops[k], [lambda: s, step, *extra]), None

  return op


def run_chunk(plan: Plan, model_fn: Callable[..., jax.Array], state: State,
              start) -> tuple[State, jax.Array | None]:
  """Runs operations start .. start + chunk_length - 1 of the plan (pure; jit it).

  Args:
    plan: from `make_plan`.
    model_fn: model_fn(x, t, state.cond) -> model output (see module docstring).
    state: from `Plan.init` or the previous chunk.
    start: int32 scalar, may be traced (one of `plan.chunk_starts`).

  Returns:
    (state, intermediates): intermediates is [chunk_length // k, B, ...], x after
    operations start + k - 1, start + 2k - 1, ... (k = intermediate_every), else None.
    Past the end of the plan the state does not change.
  """
  op = _operation(plan, model_fn, state)
  start = jnp.asarray(start, jnp.int32)
  every = plan.intermediate_every
  if not every:
    solver_state, _ = jax.lax.scan(op, state.solver, start + jnp.arange(plan.chunk_length))
    return state.replace(solver=solver_state), None

  def outer(s, ks):
    s, _ = jax.lax.scan(op, s, ks)
    return s, s.x

  ks = start + jnp.arange(plan.chunk_length).reshape(-1, every)
  solver_state, xs = jax.lax.scan(outer, state.solver, ks)
  return state.replace(solver=solver_state), xs


@functools.cache
def _run_chunk_jit(compiler_options: tuple[tuple[str, Any], ...]):
  # No donation: the state holds the caller's arrays (x_T, labels).
  return jax.jit(run_chunk, compiler_options=dict(compiler_options) or None)


def sample(model_fn, plan, key, shape=None, *, x_T=None, cond=None,
           return_intermediates: bool = False, compiler_options: dict[str, Any] | None = None):
  """Runs the whole plan (jit-compiled once per plan structure and shape).

  Args:
    model_fn: see module docstring; a `Partial` keeps parameters out of the compiled program.
    plan: a `Plan`, or a solver (run as `make_plan(solver)`).
    key, shape, x_T, cond: as in `Plan.init`.
    return_intermediates: also return x after every `plan.intermediate_every`-th operation.
    compiler_options: XLA options of the compiled chunk (the shell passes its CPU tuning,
      `jaxddpm.runtime.step_compiler_options()`).

  Returns:
    x_0 [B, ...] float32 (not clipped), and with return_intermediates
    [num_ops // intermediate_every, B, ...].
  """
  if not isinstance(plan, Plan):
    plan = make_plan(plan)
  if return_intermediates and not plan.intermediate_every:
    raise ValueError('return_intermediates needs make_plan(..., intermediate_every=k)')
  model_fn = base.as_pytree(model_fn)
  run = _run_chunk_jit(tuple(sorted((compiler_options or {}).items())))
  state = plan.init(key, shape, x_T=x_T, cond=cond)
  chunks = []
  for start in plan.chunk_starts:
    state, xs = run(plan, model_fn, state, start)
    chunks.append(xs)
  if not return_intermediates:
    return state.x
  xs = jnp.concatenate(chunks)
  return state.x, xs[:plan.num_ops // plan.intermediate_every]
