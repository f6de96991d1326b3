"""``from tritondet import ops`` can replace ``from torchvision import ops`` as a whole."""

import inspect

import pytest
import torchvision

from tritondet import ops


def test_every_torchvision_op_name_resolves():
    missing = [name for name in torchvision.ops.__all__ if not hasattr(ops, name)]
    assert not missing


@pytest.mark.parametrize("name", [name for name in ops.__all__ if name in torchvision.ops.__all__])
def test_our_ops_keep_torchvision_signatures(name):
    ours, theirs = getattr(ops, name), getattr(torchvision.ops, name)
    assert ours is not theirs, f"{name} should be tritondet's own"
    if inspect.isclass(ours):
        ours, theirs = ours.__init__, theirs.__init__
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)
    for parameter in inspect.signature(theirs).parameters.values():
        assert inspect.signature(ours).parameters[parameter.name].default == parameter.default, parameter.name


def test_unknown_names_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'not_an_op'"):
        ops.not_an_op  # noqa: B018
