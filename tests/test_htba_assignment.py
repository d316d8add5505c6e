"""HTBA matching: optax's Hungarian solver against scipy's, and the official code's greedy rule against a port of it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from bdjax.attacks import htba
from bdjax.errors import ConfigError


def _costs(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.random((n, n))
    if kind == "tied":  # only 3 distinct values: many optimal assignments
        return rng.integers(0, 3, (n, n)).astype(float)
    if kind == "constant":  # every assignment is optimal
        return np.full((n, n), 2.5)
    if kind == "rank_one":  # c_ij = u_i v_j: the optimum pairs large u with small v
        return np.outer(rng.random(n) + 0.1, rng.random(n) + 0.1)
    if kind == "dynamic_range":  # entries from 1e-3 to 1e4 (float32 keeps ~7 digits)
        return 10.0 ** rng.uniform(-3, 4, (n, n))
    if kind == "features":  # what the crafting loop feeds it: squared distances between feature vectors
        a, b = rng.standard_normal((2, n, 16))
        return np.asarray(htba.squared_distances(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    raise AssertionError(kind)


@pytest.mark.parametrize("n", [7, 100])
@pytest.mark.parametrize("kind", ["random", "tied", "constant", "rank_one", "dynamic_range", "features"])
def test_hungarian_cost_matches_scipy(kind, n):
    rng = np.random.default_rng(n)
    cost = _costs(kind, n, rng).astype(np.float32)
    perm = np.asarray(jax.jit(htba.hungarian)(jnp.asarray(cost)))
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    rows, cols = linear_sum_assignment(cost.astype(np.float64))
    best = cost.astype(np.float64)[rows, cols].sum()
    got = cost.astype(np.float64)[np.arange(n), perm].sum()
    # float32 potentials: equal up to float32 resolution of the total
    np.testing.assert_allclose(got, best, rtol=2e-6, atol=1e-6 * n)
    if kind == "random":  # a plain identity or greedy pick would be far worse: the comparison has teeth
        assert cost[np.arange(n), np.arange(n)].sum() > best + 0.5


def test_hungarian_vmaps_over_batches():
    rng = np.random.default_rng(0)
    costs = rng.random((3, 9, 9)).astype(np.float32)
    batched = np.asarray(jax.jit(jax.vmap(htba.hungarian))(jnp.asarray(costs)))
    for c, perm in zip(costs, batched):
        rows, cols = linear_sum_assignment(c)
        assert np.isclose(c[np.arange(9), perm].sum(), c[rows, cols].sum(), rtol=1e-6)


def _official_greedy(dist_sources_by_poisons: np.ndarray) -> np.ndarray:
    """A port of the reference loop: K times, the global min (i, j) of dist gives poison j source i's features,
    then only dist[i, j] is masked. Returns the source index each poison ends with."""
    dist = dist_sources_by_poisons.astype(np.float64).copy()
    k = dist.shape[0]
    src_of = np.arange(k)
    for _ in range(k):
        i, j = np.unravel_index(np.argmin(dist), dist.shape)  # row-major, as torch's nonzero()
        src_of[j] = i
        dist[i, j] = np.inf
    return src_of


def test_greedy_is_the_official_rule_and_not_one_to_one():
    # rows = sources, columns = poisons (the official orientation); source 0 is nearest to both poisons
    d = np.array([[0.0, 1.0], [5.0, 7.0]], np.float32)
    cost = jnp.asarray(d.T)  # bdjax's cost: rows = poisons
    greedy, exact = jax.jit(lambda c: (htba.greedy(c), htba.hungarian(c)))(cost)
    np.testing.assert_array_equal(greedy, [0, 0])  # both poisons pulled to source 0
    np.testing.assert_array_equal(exact, [1, 0])  # 5 + 1 < 0 + 7
    assert float(htba.assignment_cost(cost, exact)) == 6.0


@pytest.mark.parametrize("kind", ["random", "tied"])
def test_greedy_matches_a_port_of_the_reference(kind):
    rng = np.random.default_rng(1)
    d = _costs(kind, 20, rng).astype(np.float32)  # rows = sources, columns = poisons
    got = np.asarray(jax.jit(htba.greedy)(jnp.asarray(d.T)))
    np.testing.assert_array_equal(got, _official_greedy(d))
    if kind == "tied":
        assert len(set(got.tolist())) < 20  # sources reused: the reference's matching is not a permutation


def test_match_dispatches_and_rejects_unknown():
    cost = jnp.asarray([[0.0, 1.0], [5.0, 7.0]]).T
    np.testing.assert_array_equal(jax.jit(lambda c: htba.match(c, "greedy"))(cost), [0, 0])
    with pytest.raises(ConfigError, match="unknown matching"):
        htba.match(cost, "auction")


def test_squared_distances_match_the_difference_form():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 5, 7)).astype(np.float32)
    ref = ((a[:, None] - b[None]) ** 2).sum(-1)
    np.testing.assert_allclose(htba.squared_distances(jnp.asarray(a), jnp.asarray(b)), ref, rtol=1e-5, atol=1e-5)
    same = htba.squared_distances(jnp.asarray(a), jnp.asarray(a))
    assert float(jnp.min(same)) >= 0.0 and np.allclose(np.diag(same), 0.0, atol=1e-5)
