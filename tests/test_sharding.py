import pytest
from jax.sharding import PartitionSpec

from siglip_jax import config as config_lib
from siglip_jax.runtime import sharding

RULES = sharding.rules_as_tuples(config_lib.DEFAULT_AXIS_RULES)


def test_minus_one_takes_the_remaining_devices():
    assert sharding.resolve_mesh_shape((-1, 2, 1), ("data", "fsdp", "tensor"), 8) == (4, 2, 1)
    mesh = sharding.create_mesh((-1, 1, 2), ("data", "fsdp", "tensor"))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_mesh_that_does_not_fit_the_devices_is_refused():
    with pytest.raises(ValueError, match="uses 6 devices but 8 are available"):
        sharding.resolve_mesh_shape((3, 2, 1), ("data", "fsdp", "tensor"), 8)
    with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
        sharding.resolve_mesh_shape((-1, 3, 1), ("data", "fsdp", "tensor"), 8)
    with pytest.raises(ValueError, match="more than one -1"):
        sharding.resolve_mesh_shape((-1, -1, 1), ("data", "fsdp", "tensor"), 8)


def test_logical_names_map_to_mesh_axes_and_undivisible_dims_are_replicated():
    mesh = sharding.create_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert sharding.spec_for_shape(("embed", "mlp"), (64, 256), mesh, RULES) == PartitionSpec("fsdp", "tensor")
    assert sharding.spec_for_shape(("embed", "heads", "kv"), (64, 3, 16), mesh, RULES) == PartitionSpec("fsdp", None, None)
    assert sharding.spec_for_shape(("vocab", "embed"), (259, 64), mesh, RULES) == PartitionSpec(None, "fsdp")
    assert sharding.spec_for_shape(("norm",), (64,), mesh, RULES) == PartitionSpec(None)


def test_batch_is_split_over_data_and_fsdp():
    mesh = sharding.create_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert sharding.batch_axes(mesh, RULES) == ("data", "fsdp")
    assert sharding.data_parallel_size(mesh, RULES) == 4
    assert sharding.batch_sharding(mesh, RULES).spec == PartitionSpec(("data", "fsdp"))


def test_missing_rule_names_the_logical_axis():
    mesh = sharding.create_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="Logical axis 'mlp' has no entry"):
        sharding.spec_for_shape(("mlp",), (8,), mesh, (("embed", None),))
