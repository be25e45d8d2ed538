"""Checkpoints: the only module that imports Orbax.

Layout (one Orbax `CheckpointManager` over `workdir/checkpoints`):

```
workdir/checkpoints/
  400/                 one folder per saved step, written atomically
    params/            the raw parameters (an Orbax item)
    ema_params/        the EMA parameters (an Orbax item)
    train/             every other field of the state: step, opt_state, rng, ...
    data/              the data iterator's state, one JSON file per process (Grain's handler)
```

The parameters are items of their own, so `load_params` reads one alone, without knowing
(or reading) the optimizer state; a params-only checkpoint (`save_params`, for the weight
converters) has just `params` and optionally `ema_params`. A checkpoint folder only appears
under its final name once every process has finished writing it, so a run killed mid-save
leaves the previous checkpoint as the latest complete one.

Damage that happens after a save (a flipped byte, a deleted manifest, a stray empty step
folder, a NaN that slipped into the weights) is caught on restore:
`Checkpointer.restore_newest_good` and `load_params` read checkpoints newest first, reject any
that cannot be read or hold a non-finite value, and say which ones they skipped and why.
Training moves rejected checkpoints out of the way (`workdir.quarantine`, to
`workdir/checkpoints.damaged/`, DAMAGED_DIR) instead of deleting them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints.damaged'


class CheckpointError(ValueError):
  """A checkpoint that cannot be written or used; the message says which and why."""


class _OrbaxInfoFilter(logging.Filter):
  """Drops Orbax's INFO records (a dozen per save); its warnings and errors pass, as one line.

  The tracebacks Orbax logs from its background threads run to hundreds of lines; the same
  errors reach the caller as a one-line `CheckpointError`.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    record.exc_info = record.exc_text = None
    return record.levelno >= logging.WARNING


# Orbax logs through absl's logger, which the training loop's own INFO lines share.
logging.getLogger('absl').addFilter(_OrbaxInfoFilter())


def checkpoint_dir(workdir: str) -> str:
  """Returns `workdir/checkpoints` as an absolute path (Orbax requires one)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def first_line(error: BaseException, limit: int = 200) -> str:
  """`Type: first line of the message`, shortened: Orbax and TensorStore errors run to pages."""
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0] if lines else ""}'.rstrip(': ')
  return text if len(text) <= limit else text[:limit - 3] + '...'


@contextlib.contextmanager
def _save_failures():
  """Reraises any exception (Orbax raises many types) as a one-line `CheckpointError`."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'saving a checkpoint failed: {first_line(e)}') from e


@jax.jit
def _nonfinite_counts(tree: PyTree) -> dict[str, jax.Array]:
  """{top-level field: number of NaN/Inf entries in its floating-point leaves}."""
  def count(sub):
    leaves = [x for x in jax.tree.leaves(sub) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sum((jnp.sum(~jnp.isfinite(x)) for x in leaves), jnp.zeros((), jnp.int32))
  return {name: count(sub) for name, sub in tree.items()}


def nonfinite_values(state: PyTree) -> dict[str, int]:
  """Non-finite entries per field of a state (dataclass or dict), only fields that have any.

  All processes must call it (it runs one small jitted reduction over global arrays).
  """
  fields = {k: v for k, v in _fields(state).items() if jax.tree.leaves(v)}
  counts = jax.device_get(_nonfinite_counts(fields))
  return {name: int(n) for name, n in counts.items() if int(n)}


def describe_nonfinite(counts: dict[str, int]) -> str:
  return ', '.join(f'{n} in {name}' for name, n in sorted(counts.items()))


_PARAM_ITEMS = ('params', 'ema_params')
_OTHER_ITEM = 'train'
DATA_ITEM = 'data'


def _fields(state: PyTree) -> dict[str, PyTree]:
  if isinstance(state, dict):
    return dict(state)
  if dataclasses.is_dataclass(state):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  raise TypeError(f'Can only checkpoint a dict or a dataclass, got {type(state).__name__}.')


def _state_items(state: PyTree) -> dict[str, PyTree]:
  """Splits a state into Orbax items: params, ema_params, and one for the rest."""
  fields = _fields(state)
  items = {k: fields.pop(k) for k in _PARAM_ITEMS if k in fields}
  if fields:
    items[_OTHER_ITEM] = fields
  return items


def _replace_items(template: PyTree, items: dict[str, PyTree]) -> PyTree:
  """Inverse of `_state_items`, shaped like `template`."""
  items = dict(items)
  fields = {k: items.pop(k) for k in _PARAM_ITEMS if k in items}
  fields.update(items.pop(_OTHER_ITEM, {}))
  if isinstance(template, dict):
    return fields
  return dataclasses.replace(template, **fields)


def _is_empty(tree: PyTree) -> bool:
  # Orbax cannot write an item without arrays (e.g. an optax EmptyState).
  return not jax.tree.leaves(tree)


def _path_names(path) -> tuple[str, ...]:
  # Orbax's metadata turns NamedTuples into dicts and tuples into lists, so compare names only.
  names = []
  for key in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return tuple(names)


def _leaf_layout(tree: PyTree) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {_path_names(path): tuple(leaf.shape)
          for path, leaf in jax.tree.flatten_with_path(tree)[0]}


def newest_good(steps: list[int], read: Callable[[int], PyTree], *,
                check: Callable[[int], None] | None = None
                ) -> tuple[int | None, PyTree | None, list[tuple[int, str]]]:
  """The first of `steps` whose `read(step)` succeeds and holds only finite values.

  `read(step)` returns a dict (or dataclass) of pytrees; any exception it raises rejects the
  step, since Orbax and TensorStore raise many types for damaged files and all of them mean
  "unreadable". `check(step)` may raise `CheckpointError` to reject a step before it is read;
  any other exception of `check` (a config that does not fit) propagates.

  Returns:
    (step, tree, rejected): the step used and what `read` gave (None, None when no step is
    usable), and [(step, reason)] for the steps rejected before it.
  """
  rejected = []
  for step in steps:
    try:
      if check is not None:
        check(step)
      try:
        tree = read(step)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f'cannot be read ({first_line(e)})') from e
      bad = nonfinite_values(tree)
      if bad:
        raise CheckpointError(f'holds non-finite values ({describe_nonfinite(bad)})')
    except CheckpointError as e:
      rejected.append((step, str(e)))
      continue
    return step, tree, rejected
  return None, None, rejected


class Checkpointer:
  """Saves and restores a training state under `directory`, keeping the latest `keep`.

  `save` is asynchronous (arrays are copied to host memory before it returns, so the caller
  may donate or overwrite them); `wait` blocks until the last save is durable. All processes
  of a multi-host run must call `save` and `restore` together.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if int(keep) < 1:
      # Orbax reads max_to_keep=0 as "delete every checkpoint", old ones included.
      raise ValueError(f'keep = {keep}: at least one checkpoint must be kept')
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        # Removes what a killed run left of an unfinished save.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    # Naming the items' handlers lets Orbax read their metadata, so a single item can be
    # restored without a template (`restore_item`).
    handlers = {name: ocp.StandardCheckpointHandler() for name in (*_PARAM_ITEMS, _OTHER_ITEM)}
    handlers[DATA_ITEM] = grain.checkpoint.CheckpointHandler()
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def reload(self) -> None:
    """Rereads the steps on disk, after checkpoint folders were moved (`workdir.quarantine`)."""
    self._manager.reload()

  def save(self, step: int, state: PyTree, *, force: bool = False, data=None) -> bool:
    """Saves `state` (a dataclass or dict of pytrees), and data iterator `data`'s, as `step`.

    Returns False (and writes nothing) when a checkpoint for `step` exists already, e.g. a
    signal-triggered save landing on a periodic one.

    Raises:
      CheckpointError: this save, or the previous asynchronous one, failed.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {k: ocp.args.StandardSave(v)
             for k, v in _state_items(state).items() if not _is_empty(v)}
    if data is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data)
    # Orbax first waits for the previous save, so its failure (e.g. ENOSPC) surfaces here too.
    with _save_failures():
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None, abstract_state: PyTree) -> PyTree:
    """Restores checkpoint `step` (latest when None) into the structure of `abstract_state`.

    `abstract_state` is the state's pytree with `jax.ShapeDtypeStruct` leaves (e.g. from
    `jax.eval_shape`), whose shardings say where the restored arrays go.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    template = _state_items(abstract_state)
    wanted = {k: v for k, v in template.items() if not _is_empty(v)}
    restored = self._restore(step, wanted)
    items = {k: restored[k] if k in wanted else v for k, v in template.items()}
    return _replace_items(abstract_state, items)

  def _restore(self, step: int, abstract_items: dict[str, PyTree]) -> dict[str, PyTree]:
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items()}
    return self._manager.restore(int(step), args=ocp.args.Composite(**args))

  def restore_data(self, step: int, iterator) -> bool:
    """Sets `iterator`'s state (through Grain's handler: `set_state`) to checkpoint `step`'s.
    False, setting nothing, where it has none for this process: an older checkpoint, or one of
    another number of processes (Grain writes `data/process_I-of-N.json`)."""
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not os.path.isfile(os.path.join(self.directory, str(int(step)), DATA_ITEM, name)):
      return False
    self._manager.restore(int(step), args=ocp.args.Composite(
        **{DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator)}))
    return True

  def item_names(self, step: int) -> list[str]:
    """Names of the items stored in checkpoint `step` (e.g. ['ema_params', 'params'])."""
    metadata = self._manager.item_metadata(int(step))
    return sorted(name for name, value in metadata.items() if value is not None)

  def item_shapes(self, step: int, name: str, sharding=None) -> PyTree:
    """Item `name` of checkpoint `step` as a tree of `jax.ShapeDtypeStruct`s, from metadata."""
    metadata = self._manager.item_metadata(int(step))[name]
    # Newer Orbax wraps the tree of array metadata in a TreeMetadata.
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        getattr(metadata, 'tree', metadata))

  def restore_item(self, step: int, name: str) -> PyTree:
    """Restores one item as saved (nested dicts of arrays on the default device)."""
    abstract = self.item_shapes(
        step, name, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return self._restore(step, {name: abstract})[name]

  def layout_differences(self, step: int, abstract_state: PyTree) -> list[str]:
    """How the saved items of `step` differ from `abstract_state`'s, from metadata only.

    Compares every leaf's path and shape, e.g. a U-Net of another width or an optimizer chain
    with another structure (which Orbax reports only as a page-long "Structure mismatch").
    Returns ['params/Conv_0/kernel: saved (3, 3, 1, 16), wanted (3, 3, 1, 32)', ...], empty
    when they fit.
    """
    diffs = []
    for name, tree in _state_items(abstract_state).items():
      if _is_empty(tree):
        continue
      saved, wanted = _leaf_layout(self.item_shapes(step, name)), _leaf_layout(tree)
      for path in sorted(set(saved) | set(wanted)):
        if saved.get(path) != wanted.get(path):
          where = '/'.join((name, *path))
          diffs.append(f'{where}: saved {saved.get(path, "nothing")}, '
                       f'wanted {wanted.get(path, "nothing")}')
    return diffs

  def restore_newest_good(self, abstract_state: PyTree, *,
                          check: Callable[[int], None] | None = None
                          ) -> tuple[int | None, PyTree | None, list[tuple[int, str]]]:
    """Restores the newest checkpoint that reads back whole and finite (`newest_good`).

    A checkpoint is rejected when Orbax cannot restore it into `abstract_state` (missing items
    or manifests, garbage in a data file, a stray empty step folder) or when any of its
    floating-point values is NaN/Inf. Returns (step, state, [(rejected step, reason)], newest
    first).
    """
    return newest_good(sorted(self.all_steps(), reverse=True),
                       lambda step: self.restore(step, abstract_state), check=check)

  def check_for_errors(self) -> None:
    """Raises `CheckpointError` (one line) if an asynchronous save has failed. Does not block."""
    with _save_failures():
      self._manager.check_for_errors()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete.

    Raises:
      CheckpointError: one of them failed (e.g. the disk is full).
    """
    with _save_failures():
      self._manager.wait_until_finished()
      self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for pending saves (raising `CheckpointError` if one failed) and closes."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in `workdir/checkpoints`, read from the listing only.

  Does not create anything, so it is safe for checks before a run starts. Checkpoints still
  being written live in temporary folders whose names are not plain integers.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def save_params(workdir: str, params: PyTree, *, step: int = 0,
                ema_params: PyTree | None = None) -> None:
  """Writes a params-only checkpoint to `workdir/checkpoints/<step>`.

  For weight converters and other producers of trained weights: the result is read by
  `load_params` (and so by `jaxddpm.load_run`) like a training checkpoint. `ema_params` is
  stored as a separate item when given.
  """
  state = {'params': params} if ema_params is None else {'params': params,
                                                          'ema_params': ema_params}
  with Checkpointer(checkpoint_dir(workdir), async_save=False) as ckpt:
    if int(step) in ckpt.all_steps():
      raise FileExistsError(f'{ckpt.directory} already holds a checkpoint for step {step}.')
    ckpt.save(step, state, force=True)


def _read_params(ckpt: Checkpointer, step: int, ema: bool) -> dict[str, PyTree]:
  """Reads the parameter item of checkpoint `step`: {item name: params}."""
  names = ckpt.item_names(step)
  if ema and _OTHER_ITEM in names and 'ema_params' not in names:
    # A training checkpoint always has EMA parameters: its item is lost, not absent by design.
    raise CheckpointError('is missing its ema_params item')
  name = 'ema_params' if ema and 'ema_params' in names else 'params'
  if name not in names:
    raise CheckpointError(f'has no parameters (items: {names})')
  return {name: ckpt.restore_item(step, name)}


def load_params_and_step(workdir: str, *, ema: bool = True,
                         step: int | None = None) -> tuple[PyTree, int]:
  """`load_params`, also returning the step of the checkpoint it read."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoint directory {directory}.')
  with Checkpointer(directory, async_save=False) as ckpt:
    steps = [int(step)] if step is not None else sorted(ckpt.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {ckpt.directory}.')
    used, params, rejected = newest_good(steps, lambda s: _read_params(ckpt, s, ema))
  if used is None:
    if step is not None:
      raise CheckpointError(f'Checkpoint {step} in {directory} {rejected[0][1]}.')
    raise CheckpointError(f'No usable checkpoint in {directory}: ' + '; '.join(
        f'checkpoint {s} {reason}' for s, reason in rejected) + '.')
  for r_step, reason in rejected:
    logging.getLogger('absl').warning(
        'Checkpoint %d in %s %s; using checkpoint %d.', r_step, directory, reason, used)
  (params,) = params.values()
  return params, used


def load_params(workdir: str, *, ema: bool = True, step: int | None = None) -> PyTree:
  """Loads model parameters from the newest usable (or the given) checkpoint in `workdir`.

  Works for full training checkpoints and params-only ones alike, reading only the parameter
  item. With `ema=True` the EMA parameters are returned when the checkpoint has them, else the
  raw parameters (params-only checkpoints; a training checkpoint that lost its EMA item is
  rejected instead). Without `step`, a checkpoint that cannot be read or holds NaN/Inf is
  skipped with a warning naming it, and the next older one is used.

  Returns: nested dict of float32 jax arrays (the Flax params collection as saved, e.g.
  {'params': {...}} or the inner dict, whatever was saved).

  Raises:
    FileNotFoundError: no checkpoint at all.
    CheckpointError: no usable checkpoint (or the given `step` is unusable); says why.
  """
  return load_params_and_step(workdir, ema=ema, step=step)[0]
