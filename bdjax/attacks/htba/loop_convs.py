"""Convolution gradients that XLA:CPU runs at full speed inside `lax.while_loop`.

Why: XLA:CPU hands a convolution to its fast (Eigen) kernel only in the canonical layout (NHWC input, HWIO kernel);
it rewrites other layouts into that one with a transpose, but only in the entry computation, not in loop bodies
(jax-ml/jax#12868). The input gradient of an NHWC/HWIO convolution reads the kernel as HWOI, so inside the
crafting loop every backward convolution fell to the naive emitter: measured 4-6x slower per step than the same
step dispatched from Python (mnist_cnn, 16x16, K = 100, one core). `loop_friendly_convs(f)` re-runs f's jaxpr
with each convolution wrapped in a custom VJP whose backward pass transposes the kernel explicitly, so the
gradient convolution is canonical. Values and gradients are those of f (tests/test_htba_crafting.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax import lax
from jax.extend import core as jcore

from bdjax.models.common import with_backward


def loop_friendly_convs(fun: Callable) -> Callable:
    """`fun` with every convolution's kernel read in the canonical layout by its gradient too (any pytree in/out)."""

    @functools.wraps(fun)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


def _eval(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outvals = [_conv(*invals, **eqn.params)]
        elif eqn.primitive.name in ("jit", "pjit") and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]  # inlined: a convolution may sit inside a jitted helper
            outvals = _eval(inner.jaxpr, inner.consts, invals)
        else:
            bound = eqn.primitive.get_bind_params(eqn.params)
            # jax >= 0.10 returns the params; older releases returned (subfuns, params).
            subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
            outvals = eqn.primitive.bind(*subfuns, *invals, **params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _conv(lhs, rhs, **params):
    bind = functools.partial(lax.conv_general_dilated_p.bind, **params)
    dn = params["dimension_numbers"]
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return bind(lhs, rhs)  # grouped: the swapped form below would not be the same convolution
    o, i = dn.rhs_spec[0], dn.rhs_spec[1]
    swapped_dn = dn._replace(rhs_spec=(i, o, *dn.rhs_spec[2:]))

    def swapped(lhs, rhs):
        # The same convolution over the kernel with its in/out axes exchanged: its gradient reads that copy
        # in the canonical layout.
        return lax.conv_general_dilated_p.bind(lhs, jax.numpy.swapaxes(rhs, o, i),
                                               **{**params, "dimension_numbers": swapped_dn})

    return with_backward(bind, lambda lhs, rhs, g: jax.vjp(swapped, lhs, rhs)[1](g))(lhs, rhs)
