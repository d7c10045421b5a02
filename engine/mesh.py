"""Device mesh and shardings: logical axis names (from the model) -> mesh axes (from config)."""

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

# Mesh axes a batch is split over; the model's 'batch' logical axis maps onto them.
BATCH_AXES = ('data', 'fsdp')


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules):
    """The mesh and logical rules that model tracing needs for its sharding constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def process_rows(global_batch_size: int, mesh: Mesh | None = None) -> tuple[int, int]:
    """This process's [start, stop) rows of a global batch: with `mesh`, exactly the rows
    `batch_sharding(mesh)` places on this process's devices (what
    `jax.make_array_from_process_local_data` expects in `shard_batch`); without, an even
    split by process index."""
    if mesh is None:
        per_process = global_batch_size // jax.process_count()
        return jax.process_index() * per_process, (jax.process_index() + 1) * per_process
    slices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                   for s in slices.values()})
    lo, hi = rows[0][0], rows[-1][1]
    if sum(stop - start for start, stop in rows) != hi - lo:
        raise ValueError(f'this process holds non-contiguous batch rows {rows}; order the '
                         'mesh so that each process owns a contiguous block of the batch')
    return lo, hi


def data_shard(global_batch_size: int, mesh: Mesh) -> tuple[int, int]:
    """(shard index, shard count) for a data pipeline that serves rows
    [index*B/count, (index+1)*B/count): this process's rows in `mesh`. Processes that
    share rows (a model axis across hosts) get the same index."""
    lo, hi = process_rows(global_batch_size, mesh)
    return lo // (hi - lo), global_batch_size // (hi - lo)


def resolve_mesh_shape(shape: Sequence[int], axes: Sequence[str], num_devices: int) -> tuple:
    """Pads `shape` with 1s to len(axes), fills one -1 from the device count, checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > len(axes):
        raise ValueError(f'mesh.shape {shape} has more dims than mesh.axes {tuple(axes)}')
    shape = shape + (1,) * (len(axes) - len(shape))
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f'mesh.shape {shape}: use positive sizes and at most one -1')
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f'mesh.shape {shape}: {num_devices} devices do not divide by {known}')
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f'mesh.shape {shape} needs {math.prod(shape)} devices, '
                         f'but {num_devices} are available')
    return shape


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axis types, which Flax's logical
    sharding constraints need."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(shape, axes, len(devices))
    return jax.make_mesh(shape, tuple(axes), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def abstract_and_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules):
    """Shapes and NamedShardings of what `init_fn` returns, from its logical annotations.

    Nothing is allocated: `jax.eval_shape` traces `init_fn`, the `nn.Partitioned` boxes
    carry logical names, and `rules` turn them into mesh shardings. Leaves without
    annotations (step counters, optimizer scalars) are replicated.
    """
    abstract = jax.eval_shape(init_fn)
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return strip_boxes(abstract), shardings


def strip_boxes(tree: Any) -> Any:
    """Removes `nn.Partitioned` boxes without `nn.unbox`'s sharding constraint (which
    cannot apply to abstract values)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                        is_leaf=is_box)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Builds global arrays from this process's rows of the batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def describe_shardings(params: Any, shardings: Any) -> list[str]:
    """One line per parameter: path, shape and PartitionSpec (for logs and dry runs)."""
    lines = []
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree_util.tree_leaves(shardings)
    for (path, leaf), sharding in zip(flat_params, flat_shardings, strict=True):
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        lines.append(f'{name:70s} {str(tuple(leaf.shape)):16s} {sharding.spec}')
    return lines


def per_device_shape(shape: tuple, spec: PartitionSpec, mesh_shape: dict) -> tuple:
    """The shard each device holds (ceil division, as XLA pads uneven shards)."""
    out = []
    for i, size in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(-(-size // math.prod(mesh_shape[a] for a in axes)))
    return tuple(out)


def sharded_bytes(tree, shardings, mesh_shape: dict) -> int:
    """Bytes per device of an abstract tree laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = per_device_shape(tuple(leaf.shape), sharding.spec, mesh_shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
