"""A method declares itself (mlpfuse/methods/catalog.py): a method added by one registration fuses a
checkpoint through the library and is listed; what each built-in declares is what it does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mlpfuse
from mlpfuse import FuseSettings, fuse_checkpoint
from mlpfuse.compress.fuse_layers import compress_layer
from mlpfuse.compress.kmeans import KMeansResult
from mlpfuse.errors import InputError
from mlpfuse.methods import (BUILTIN, REPORT_FIELDS, Calibration, MethodDeclaration, MethodOptions, check_calibrated,
                             check_can_write, get_method, method_names, register, unregister)
from mlpfuse.methods.calibrated import size_histogram

from .conftest import random_mlp
from .test_calibrated import inputs


@pytest.fixture
def first_method():
    """A method kept in the tests: its declaration and its one function are all it takes."""

    @register(MethodDeclaration("first", help="keep the first k neurons", writes=("dense", "gated")))
    def first(mlp, k, options):
        kept = mlp.map_neurons(lambda t: t[:k].clone(), lambda w: w[:, :k].clone())
        kept.stats = {"rank": -1}  # not declared as a report field: it must not reach the report
        return kept

    yield first
    unregister("first")


def test_a_method_added_by_one_registration_fuses_a_checkpoint_and_is_listed(first_method, tiny_checkpoint, tmp_path):
    assert "first" in method_names()
    with pytest.raises(InputError, match="unknown method 'frist'; choose one of: .*first"):
        get_method("frist")
    source, model, task = tiny_checkpoint("bert")
    report = fuse_checkpoint(str(source), tmp_path / "out", FuseSettings(layers="0", dim=5, method="first"))
    assert report.method == "first" and [layer.width for layer in report.layers] == [5]
    assert report.layers[0].rank is None  # undeclared stats stay out of the report
    loaded = mlpfuse.load(tmp_path / "out", task=task).state_dict()
    original = model.state_dict()
    for name, kept in (("intermediate.dense.weight", lambda t: t[:5]), ("intermediate.dense.bias", lambda t: t[:5]),
                       ("output.dense.weight", lambda t: t[:, :5])):
        key = f"bert.encoder.layer.0.{name}"
        assert torch.equal(loaded[key], kept(original[key])), key
    # what the declaration says is what the checks use
    with pytest.raises(InputError, match="--method first has no data-aware form; with --calibration use one of: "
                                         "cluster, fusion, prune, svd"):
        check_calibrated("first")
    with pytest.raises(InputError, match="first cannot write conv1d .* first writes dense, gated"):
        check_can_write("first", {"conv1d": "0"})


def test_declarations_are_checked_when_registered():
    run = lambda mlp, k, options: mlp  # noqa: E731
    with pytest.raises(ValueError, match="declares a calibrated form but none was given"):
        register(MethodDeclaration("x", help="x", calibrated="a refit"))(run)
    with pytest.raises(ValueError, match="declares no calibrated form but one was given"):
        register(MethodDeclaration("x", help="x"), calibrated=run)(run)
    with pytest.raises(ValueError, match="not declared"):
        register("no-such-builtin")
    with pytest.raises(ValueError, match="already registered"):
        register(MethodDeclaration("fusion", help="another fusion"))
    with pytest.raises(ValueError, match="unknown layouts"):
        MethodDeclaration("x", help="x", writes=("dense", "packed"))
    with pytest.raises(ValueError, match="unknown report fields"):
        MethodDeclaration("x", help="x", report_fields=("mmd2",))
    assert "x" not in method_names()


@pytest.mark.parametrize("declaration", BUILTIN, ids=lambda d: d.name)
def test_every_builtin_does_what_it_declares(declaration):
    """Report fields: each declared one is filled by a form of the method and no undeclared one is;
    a calibrated form exactly when declared; a method that clusters uses the clustering it is given."""
    method = get_method(declaration.name)
    assert method.declaration is declaration and method.writes == declaration.writes
    mlp, k = random_mlp(small=True), 12
    forms = [method(mlp, k, MethodOptions(backend="torch"))]
    calibration = Calibration(inputs(64), torch.nn.functional.gelu, protect=2)
    if declaration.calibrated is not None:
        forms.append(method(mlp, k, MethodOptions(backend="torch", calibration=calibration)))
    else:
        with pytest.raises(InputError, match="no data-aware form"):
            method(mlp, k, MethodOptions(calibration=calibration))
    filled = {name for form in forms for name in REPORT_FIELDS if form.stats.get(name) is not None}
    assert filled == set(declaration.report_fields)
    if declaration.clusters:
        labels = torch.arange(mlp.width) % k
        given = KMeansResult(labels, None, None, 0.0, "given", 0)
        clustered = method(mlp, k, MethodOptions(clustering=given))
        assert clustered.stats["cluster_sizes"] == size_histogram(torch.bincount(labels, minlength=k))
        assert clustered.stats["backend"] == "given"


def test_the_layer_report_takes_the_declared_fields():
    mlp = random_mlp(small=True)
    plan = SimpleNamespace(site=SimpleNamespace(index=0, label="0"), original_width=mlp.width, width=12)  # what it reads
    _, report = compress_layer(plan, mlp, "svd", MethodOptions())
    assert report.rank is not None and report.inertia is None and report.cluster_sizes is None
    _, report = compress_layer(plan, mlp, "fusion", MethodOptions(backend="torch"))
    assert report.rank is None and report.inertia > 0 and sum(report.cluster_sizes.values()) == 12
