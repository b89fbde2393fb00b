"""Projections of a layer-normalised input, recomputing the normalisation in backward, against autograd."""

import pytest
import torch
from torch import nn

from torch_reformer.attention.projection import project


def make(dtype=torch.float64):
    torch.manual_seed(0)
    norm = nn.LayerNorm(6, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    linears = [nn.Linear(6, width, bias=False).to(dtype) for width in (4, 6, 2)]
    hidden = torch.randn(2, 5, 6, dtype=dtype, requires_grad=True)
    return hidden, norm, linears


def parameters(norm, linears):
    return [norm.weight, norm.bias] + [linear.weight for linear in linears]


def test_values_and_gradients_equal_layer_norm_then_linears():
    hidden, norm, linears = make()
    outputs = project(hidden, linears, norm)
    expected = [linear(norm(hidden)) for linear in linears]
    probes = [torch.randn_like(out) for out in expected]
    wrt = [hidden, *parameters(norm, linears)]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes)), wrt)
    expected_grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(expected, probes)), wrt)
    for out, reference in zip(outputs, expected):
        assert torch.allclose(out, reference, atol=1e-14)
    for grad, reference in zip(grads, expected_grads):
        assert torch.allclose(grad, reference, atol=1e-12)


def test_gradcheck_with_an_unused_projection_and_frozen_norm():
    hidden, norm, linears = make()
    norm.weight.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda x, w: project(x, [linears[0], linears[1]], norm)[0] * w.sum(),
                                     (hidden, linears[1].weight))


def test_bfloat16_autocast_matches_autograd_under_autocast():
    hidden, norm, linears = make(torch.float32)
    probes = [torch.randn(2, 5, linear.out_features) for linear in linears]
    wrt = [hidden, *parameters(norm, linears)]
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = project(hidden, linears, norm) if fused else [linear(norm(hidden)) for linear in linears]
            loss = sum((o.float() * p).sum() for o, p in zip(outputs, probes))
        results.append(([o.dtype for o in outputs], torch.autograd.grad(loss, wrt)))
    (dtypes, grads), (expected_dtypes, expected_grads) = results
    assert dtypes == expected_dtypes == [torch.bfloat16] * 3
    for grad, reference in zip(grads, expected_grads):
        assert grad.dtype == reference.dtype
        assert torch.allclose(grad, reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["no norm", "biased linear"])
def test_falls_back_to_plain_modules(case):
    hidden, norm, linears = make()
    if case == "biased linear":
        linears[0] = nn.Linear(6, 4).double()
    use_norm = None if case == "no norm" else norm
    expected = [linear(hidden if use_norm is None else norm(hidden)) for linear in linears]
    for out, reference in zip(project(hidden, linears, use_norm), expected):
        assert torch.equal(out, reference)
