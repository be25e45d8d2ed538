"""Checkpoints: the only module that imports Orbax.

Layout (one Orbax `CheckpointManager` over `workdir/checkpoints`):

```
workdir/checkpoints/
  000000400/           one folder per saved step, written atomically
    params/            the raw parameters (an Orbax item)
    ema_params/        the EMA parameters (an Orbax item)
    train/             every other field of the state: step, opt_state, rng, ...
```

The parameters are items of their own, so `load_params` can read `params` or
`ema_params` alone, without knowing (or reading) the optimizer state. A params-only checkpoint (`save_params`, used by the weight converters)
has just the `params` item and optionally `ema_params`.

A checkpoint folder only appears under its final name once every process has
finished writing it, so a run killed mid-save leaves the previous checkpoint as
the latest complete one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINT_DIR = 'checkpoints'


class _OrbaxInfoFilter(logging.Filter):
  """Drops Orbax's INFO records (a dozen per save); its warnings and errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


# Orbax logs through absl's logger, which the training loop's own INFO lines share.
logging.getLogger('absl').addFilter(_OrbaxInfoFilter())


def checkpoint_dir(workdir: str) -> str:
  """Returns `workdir/checkpoints` as an absolute path (Orbax requires one)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


_PARAM_ITEMS = ('params', 'ema_params')
_OTHER_ITEM = 'train'


def _fields(state: PyTree) -> dict[str, PyTree]:
  if isinstance(state, dict):
    return dict(state)
  if dataclasses.is_dataclass(state):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  raise TypeError(
      f'Can only checkpoint a dict or a dataclass, got {type(state).__name__}.')


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


class Checkpointer:
  """Saves and restores a training state under `directory`, keeping the latest `keep`.

  `save` is asynchronous (arrays are copied to host memory before it returns,
  so the caller may donate or overwrite them); `wait` blocks until the last
  save is durable. All processes of a multi-host run must call `save` and
  `restore` together.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        # Removes what a killed run left of an unfinished save.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    # Naming the items' handlers lets Orbax read their metadata, so a single
    # item can be restored without a template (`restore_item`).
    handlers = {name: ocp.StandardCheckpointHandler()
                for name in (*_PARAM_ITEMS, _OTHER_ITEM)}
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` (a dataclass or dict of pytrees) as checkpoint `step`.

    Returns False (and writes nothing) when a checkpoint for `step` exists
    already, e.g. a signal-triggered save landing on a periodic one.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {k: ocp.args.StandardSave(v)
             for k, v in _state_items(state).items() if not _is_empty(v)}
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None, abstract_state: PyTree) -> PyTree:
    """Restores checkpoint `step` (latest when None) into the structure of `abstract_state`.

    `abstract_state` is the state's pytree with `jax.ShapeDtypeStruct` leaves
    (e.g. from `jax.eval_shape`), whose shardings say where the restored
    arrays go.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    template = _state_items(abstract_state)
    wanted = {k: v for k, v in template.items() if not _is_empty(v)}
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(v) for k, v in wanted.items()}))
    items = {k: restored[k] if k in wanted else v for k, v in template.items()}
    return _replace_items(abstract_state, items)

  def item_names(self, step: int) -> list[str]:
    """Names of the items stored in checkpoint `step` (e.g. ['ema_params', 'params'])."""
    metadata = self._manager.item_metadata(int(step))
    return sorted(name for name, value in metadata.items() if value is not None)

  def _item_metadata(self, step: int, name: str) -> PyTree:
    metadata = self._manager.item_metadata(int(step))[name]
    # Newer Orbax wraps the tree of array metadata in a TreeMetadata.
    return getattr(metadata, 'tree', metadata)

  def item_shapes(self, step: int, name: str) -> PyTree:
    """The saved item `name` of checkpoint `step` as a tree of `jax.ShapeDtypeStruct`s (no data read)."""
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        self._item_metadata(step, name))

  def restore_item(self, step: int, name: str) -> PyTree:
    """Restores one item as saved (nested dicts of arrays on the default device)."""
    metadata = self._item_metadata(step, name)
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        metadata)
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)}))
    return restored[name]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in `workdir/checkpoints`, read from the listing only.

  Does not create anything, so it is safe for checks before a run starts.
  Checkpoints still being written live in temporary folders whose names are
  not plain integers.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def save_params(workdir: str, params: PyTree, *, step: int = 0,
                ema_params: PyTree | None = None) -> None:
  """Writes a params-only checkpoint to `workdir/checkpoints/<step>`.

  For weight converters and other producers of trained weights: the result is
  read by `load_params` (and so by `jaxddpm.load_run`) like a training
  checkpoint. `ema_params` is stored as a separate item when given.
  """
  state = {'params': params}
  if ema_params is not None:
    state['ema_params'] = ema_params
  with Checkpointer(checkpoint_dir(workdir), async_save=False) as ckpt:
    if int(step) in ckpt.all_steps():
      raise FileExistsError(
          f'{ckpt.directory} already holds a checkpoint for step {step}.')
    ckpt.save(step, state, force=True)


def load_params(workdir: str, *, ema: bool = True, step: int | None = None) -> PyTree:
  """Loads model parameters from the latest (or the given) checkpoint in `workdir`.

  Works for full training checkpoints and params-only ones alike, reading only
  the parameter item. With `ema=True` the EMA parameters are returned when the
  checkpoint has them, else the raw parameters.

  Returns: nested dict of float32 jax arrays (the Flax params collection as
  saved, e.g. {'params': {...}} or the inner dict, whatever was saved).
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoint directory {directory}.')
  with Checkpointer(directory, async_save=False) as ckpt:
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {ckpt.directory}.')
    names = ckpt.item_names(step)
    name = 'ema_params' if ema and 'ema_params' in names else 'params'
    if name not in names:
      raise FileNotFoundError(
          f'Checkpoint {step} in {ckpt.directory} has no parameters (items: {names}).')
    return ckpt.restore_item(step, name)
