import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtvision.errors import UnknownNameError
from mtvision.optim import (
    AGGREGATORS,
    IMTLG,
    MGDA,
    NTKMTL,
    AlignedMTL,
    CAGrad,
    EqualWeights,
    FairGrad,
    GradVac,
    NashMTL,
    PCGrad,
    SDMGrad,
    UPGrad,
    graddrop,
    make_aggregator,
)
from mtvision.optim.aggregators import fair_weights, nash_alpha
from mtvision.optim.aggregators.sdmgrad import simplex_projection

CONFLICT = np.array([[1.0, 0.0], [-0.5, 1.0]])  # the brief's hand case: g1·g2 = -1/2
ORTHO = np.array([[1.0, 0.0], [0.0, 2.0]])
ALIGNED = np.array([[1.0, 0.0], [2.0, 0.0]])


def gram(g: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(g @ g.T)


def update(agg, g: np.ndarray, **kw) -> np.ndarray:
    """d = wᵀG from the aggregator's weights on K = G Gᵀ."""
    return agg.weights(gram(g), **kw).numpy() @ g


def rand_grads(t: int, p: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, p))


def conflicting(t: int, p: int, seed: int) -> np.ndarray:
    """Random gradients with at least one conflicting pair."""
    for s in range(seed, seed + 1000):
        g = rand_grads(t, p, s)
        k = g @ g.T
        if (k < 0).any():
            return g
    raise AssertionError("no conflicting draw")


# ---------------------------------------------------------------- registry and contract


def test_registry_names_and_did_you_mean():
    assert set(AGGREGATORS) == {"ew", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "gradvac",
                                "fairgrad", "sdmgrad", "ntkmtl"}
    for name, cls in AGGREGATORS.items():
        agg = make_aggregator(name)
        assert isinstance(agg, cls) and agg.name == name
    assert isinstance(make_aggregator("cagrad", c=0.5), CAGrad) and make_aggregator("cagrad", c=0.5).c == 0.5
    with pytest.raises(UnknownNameError, match="did you mean 'pcgrad'"):
        make_aggregator("pcgard")
    with pytest.raises(TypeError):
        make_aggregator("mgda", bogus=1)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_bad_gramians_are_rejected(name):
    agg = make_aggregator(name)
    with pytest.raises(ValueError, match="square"):
        agg.weights(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        agg.weights(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        agg.weights(torch.ones(0, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match="symmetric"):
        agg.weights(torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        agg.weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        agg.weights(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="negative diagonal"):
        agg.weights(torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_single_task_gets_weight_one(name):
    w = make_aggregator(name).weights(torch.tensor([[4.0]]))
    assert w.dtype == torch.float32 and w.tolist() == [1.0]


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("g", [
    np.array([[1.0, 0.0], [0.0, 0.0]]),
    np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 1.0, 0.0]]),
    np.zeros((3, 4)),
])
def test_zero_gradient_task_gives_finite_weights(name, g):
    agg = make_aggregator(name)
    for _ in range(2):  # stateful methods: twice
        w = agg.weights(gram(g))
        assert torch.isfinite(w).all()
        d = w.numpy() @ g
        assert np.isfinite(d).all()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_dtype_is_kept_and_float32_agrees_with_float64(name):
    g = conflicting(3, 6, 1)
    w64 = make_aggregator(name).weights(gram(g))
    w32 = make_aggregator(name).weights(gram(g).float())
    assert w64.dtype == torch.float64 and w32.dtype == torch.float32
    assert np.allclose(w32.numpy(), w64.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_only_the_gramian_matters_rotation_invariance(name):
    """A random orthogonal change of parameter coordinates G -> G Q leaves K, hence w, unchanged,
    and the update rotates with the parameters: d' = d Q."""
    g = conflicting(4, 6, 2)
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((6, 6)))
    gq = g @ q
    w = make_aggregator(name).weights(gram(g)).numpy()
    wq = make_aggregator(name).weights(gram(gq)).numpy()
    assert np.allclose(w, wq, rtol=1e-6, atol=1e-8)
    assert np.allclose((w @ g) @ q, wq @ gq, atol=1e-8)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_state_dict_round_trip_reproduces_the_next_weights(name):
    gs = [conflicting(3, 5, s) for s in (10, 20, 30)]
    agg = make_aggregator(name)
    agg.weights(gram(gs[0]))
    state = agg.state_dict()
    w1 = agg.weights(gram(gs[1]))
    w2 = agg.weights(gram(gs[2]))
    fresh = make_aggregator(name)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weights(gram(gs[1])), w1)
    assert torch.equal(fresh.weights(gram(gs[2])), w2)
    agg.reset()
    again = make_aggregator(name)
    assert torch.equal(agg.weights(gram(gs[0])), again.weights(gram(gs[0])))


def test_equal_weights_is_the_sum():
    g = conflicting(3, 4, 0)
    assert np.allclose(update(EqualWeights(), g), g.sum(0))


# ---------------------------------------------------------------- MGDA


def test_mgda_two_task_hand_cases():
    assert np.allclose(MGDA().weights(gram(np.array([[1.0, 0.0], [0.0, 1.0]]))).numpy(), [0.5, 0.5])
    assert np.allclose(MGDA().weights(gram(ALIGNED)).numpy(), [1.0, 0.0])  # g1 is the hull's min-norm point
    w = MGDA().weights(gram(CONFLICT)).numpy()
    assert np.allclose(w, [7 / 13, 6 / 13])
    assert np.allclose(w @ CONFLICT, [4 / 13, 6 / 13])


def _grid_min_norm(g: np.ndarray, n: int = 400) -> float:
    a, b = np.meshgrid(np.linspace(0, 1, n + 1), np.linspace(0, 1, n + 1))
    keep = a + b <= 1
    w = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    return float((np.linalg.norm(w @ g, axis=1) ** 2).min())


@pytest.mark.parametrize("seed", range(4))
def test_mgda_is_the_min_norm_point_of_the_hull(seed):
    g = conflicting(3, 3, seed * 7)
    w = MGDA().weights(gram(g)).numpy()
    d = w @ g
    assert (w >= -1e-12).all() and w.sum() == pytest.approx(1.0)
    grid = _grid_min_norm(g)
    assert d @ d <= grid + 1e-12
    assert d @ d >= grid - 1e-2 * (g**2).sum() / 400  # the grid is fine enough to be close
    # KKT of the min-norm problem (the paper's descent property): d·g_t >= |d|^2, equal on the support
    dots = g @ d
    assert (dots >= d @ d - 1e-9).all()
    assert np.allclose(dots[w > 1e-9], d @ d, atol=1e-9)


@pytest.mark.parametrize("t,p", [(3, 8), (5, 8), (10, 20), (6, 3)])
def test_mgda_kkt_many_tasks(t, p):
    g = rand_grads(t, p, t * p)
    w = MGDA().weights(gram(g)).numpy()
    d = w @ g
    assert (w >= -1e-12).all() and w.sum() == pytest.approx(1.0)
    assert (g @ d >= d @ d - 1e-9).all()
    assert np.allclose((g @ d)[w > 1e-8], d @ d, atol=1e-9)


def test_mgda_normalizations():
    g = np.array([[10.0, 0.0], [0.0, 1.0]])
    # l2: the hull of the unit gradients; min-norm point (1/2, 1/2) of u1, u2 -> w on the originals
    assert np.allclose(MGDA(normalization="l2").weights(gram(g)).numpy(), [0.5, 0.5])
    assert np.allclose(MGDA().weights(gram(g)).numpy(), [1 / 101, 100 / 101])
    losses = torch.tensor([10.0, 1.0])
    assert np.allclose(MGDA(normalization="loss").weights(gram(g), losses=losses).numpy(), [0.5, 0.5])
    # loss+: g_t / (L_t |g_t|) = (0.1, 0), (0, 1) -> min-norm weights 100/101, 1/101
    assert np.allclose(MGDA(normalization="loss+").weights(gram(g), losses=losses).numpy(), [100 / 101, 1 / 101])
    with pytest.raises(ValueError, match="losses"):
        MGDA(normalization="loss").weights(gram(g))
    with pytest.raises(ValueError, match="expected 2 losses"):
        MGDA(normalization="loss").weights(gram(g), losses=torch.ones(3))
    with pytest.raises(ValueError, match="normalization"):
        MGDA(normalization="l1")


# ---------------------------------------------------------------- PCGrad


def test_pcgrad_two_task_closed_form():
    w = PCGrad().weights(gram(CONFLICT)).numpy()
    # g1' = g1 - (g1·g2/|g2|^2) g2 = g1 + 0.4 g2; g2' = g2 + 0.5 g1 -> sum = 1.5 g1 + 1.4 g2
    assert np.allclose(w, [1.5, 1.4])
    assert np.allclose(w @ CONFLICT, [0.8, 1.4])
    assert np.allclose(PCGrad().weights(gram(ORTHO)).numpy(), [1.0, 1.0])  # no conflict: plain sum
    assert np.allclose(PCGrad().weights(gram(ALIGNED)).numpy(), [1.0, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks_no_conflict_after_projection(seed):
    g = conflicting(2, 4, seed * 11)
    k = g @ g.T
    d = update(PCGrad(), g)
    expected = g.sum(0) - k[0, 1] * (g[0] / k[0, 0] + g[1] / k[1, 1])  # the paper's T = 2 update
    assert np.allclose(d, expected)
    assert (g @ d >= -1e-12).all()


def _pcgrad_reference(g: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """The paper's algorithm on explicit vectors, drawing the same orders as PCGrad's generator."""
    out = []
    for i in range(len(g)):
        gi = g[i].copy()
        for j in [j for j in torch.randperm(len(g), generator=gen).tolist() if j != i]:
            if gi @ g[j] < 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return np.sum(out, 0)


@pytest.mark.parametrize("t", [3, 5])
def test_pcgrad_matches_gradient_space_projection_for_the_same_order(t):
    gen = torch.Generator().manual_seed(7)
    agg = PCGrad(seed=7)
    for seed in (5, 6, 7):  # the order stream continues across calls
        g = conflicting(t, 6, seed)
        assert np.allclose(update(agg, g), _pcgrad_reference(g, gen))


def test_pcgrad_order_matters_and_is_seeded():
    # g1 conflicts with g2 and g3; projecting onto g2 first or g3 first gives different g1'
    g = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -2.0]])
    ws = {tuple(np.round(PCGrad(seed=s).weights(gram(g)).numpy(), 12)) for s in range(20)}
    assert len(ws) > 1
    assert torch.equal(PCGrad(seed=3).weights(gram(g)), PCGrad(seed=3).weights(gram(g)))


# ---------------------------------------------------------------- CAGrad


def _cagrad_primal(g: np.ndarray, c: float) -> np.ndarray:
    """max_d min_t g_t·d s.t. |d - g0| <= c |g0|, solved directly in gradient space."""
    g0 = g.mean(0)
    r2 = c**2 * (g0 @ g0)
    p = g.shape[1]
    cons = [{"type": "ineq", "fun": lambda x: g @ x[:p] - x[p]},
            {"type": "ineq", "fun": lambda x: r2 - (x[:p] - g0) @ (x[:p] - g0)}]
    x0 = np.concatenate([g0, [min(g @ g0) - 1.0]])
    res = minimize(lambda x: -x[p], x0, constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert res.success
    return res.x[:p]


@pytest.mark.parametrize("g", [CONFLICT, conflicting(3, 3, 4), conflicting(4, 5, 8)], ids=["hand", "t3", "t4"])
def test_cagrad_matches_direct_primal_optimisation(g):
    d = update(CAGrad(c=0.4, rescale=0), g)
    ref = _cagrad_primal(g, 0.4)
    assert np.allclose(d, ref, atol=1e-5)
    g0 = g.mean(0)
    assert np.linalg.norm(d - g0) == pytest.approx(0.4 * np.linalg.norm(g0), rel=1e-6)  # on the ball's boundary
    assert min(g @ d) > min(g @ g0)  # improves the worst task over the average gradient


def test_cagrad_rescale_and_c_zero():
    g = conflicting(3, 4, 6)
    w0 = CAGrad(rescale=0).weights(gram(g)).numpy()
    assert np.allclose(CAGrad().weights(gram(g)).numpy(), w0 / 1.16)
    assert np.allclose(CAGrad(rescale=2).weights(gram(g)).numpy(), w0 / 1.4)
    assert np.allclose(CAGrad(c=0.0).weights(gram(g)).numpy(), np.full(3, 1 / 3))  # c = 0: the mean gradient
    with pytest.raises(ValueError):
        CAGrad(rescale=3)


def test_cagrad_aligned_gradients_move_along_them():
    d = update(CAGrad(rescale=0), ALIGNED)
    assert np.allclose(d, [1.5 + 0.4 * 1.5, 0.0], atol=1e-6)  # g0 = (1.5, 0) pushed c|g0| towards g1


# ---------------------------------------------------------------- IMTL-G


def _projections(g: np.ndarray, d: np.ndarray) -> np.ndarray:
    return g @ d / np.linalg.norm(g, axis=1)


def test_imtl_g_hand_cases():
    assert np.allclose(IMTLG().weights(gram(ORTHO)).numpy(), [2 / 3, 1 / 3])  # d = (2/3, 2/3)
    w = IMTLG().weights(gram(CONFLICT)).numpy()
    assert w.sum() == pytest.approx(1.0)
    p = _projections(CONFLICT, w @ CONFLICT)
    assert p[0] == pytest.approx(p[1]) and p[0] > 0
    w = IMTLG().weights(gram(ALIGNED)).numpy()  # parallel: every split qualifies; finite, sums to 1
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("t,p", [(3, 3), (3, 8), (5, 8), (10, 12)])
def test_imtl_g_equal_projections_on_unit_gradients(t, p):
    g = rand_grads(t, p, t + p) * np.arange(1, t + 1)[:, None]  # unequal norms
    w = IMTLG().weights(gram(g)).numpy()
    assert w.sum() == pytest.approx(1.0)
    proj = _projections(g, w @ g)
    assert np.allclose(proj, proj[0], rtol=1e-8)


def test_imtl_g_zero_task_is_excluded():
    g = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    assert np.allclose(IMTLG().weights(gram(g)).numpy(), [2 / 3, 0.0, 1 / 3])


# ---------------------------------------------------------------- Nash-MTL


def test_nash_mtl_hand_cases():
    assert np.allclose(NashMTL(max_norm=0).weights(gram(ORTHO)).numpy(), [1.0, 0.5])  # K = diag(1, 4)
    same = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert np.allclose(NashMTL(max_norm=0).weights(gram(same)).numpy(), [1 / math.sqrt(2)] * 2)
    # max_norm = 1: d = (1, 1) has norm sqrt 2 and is clipped like clip_grad_norm_
    w = NashMTL().weights(gram(ORTHO)).numpy()
    assert np.allclose(w, np.array([1.0, 0.5]) / (math.sqrt(2) + 1e-6))
    assert np.linalg.norm(w @ ORTHO) <= 1.0


@pytest.mark.parametrize("t,p,seed", [(2, 2, 0), (3, 3, 1), (3, 8, 2), (5, 8, 3), (10, 20, 4)])
def test_nash_mtl_solves_the_bargaining_equation(t, p, seed):
    g = rand_grads(t, p, seed) + 0.5  # a common direction exists, so the solution exists
    agg = NashMTL(max_norm=0)
    alpha = agg.weights(gram(g)).numpy()
    assert (alpha > 0).all()
    assert np.allclose(alpha * (gram(g).numpy() @ alpha), 1.0, atol=1e-9)
    assert np.allclose(agg.alpha, alpha)
    # the same solution scaled by 1/sqrt(s) when K is scaled by s
    assert np.allclose(NashMTL(max_norm=0).weights(gram(3.0 * g)).numpy(), alpha / 3.0)


def test_nash_mtl_warm_start_and_update_every():
    g1, g2 = rand_grads(3, 5, 1) + 0.5, rand_grads(3, 5, 2) + 0.5
    agg = NashMTL(max_norm=0, update_weights_every=2)
    a1 = agg.weights(gram(g1))
    assert torch.equal(agg.weights(gram(g2)), a1)  # reused on the off step
    a3 = agg.weights(gram(g2)).numpy()
    assert np.allclose(a3 * (gram(g2).numpy() @ a3), 1.0, atol=1e-9)  # warm-started from a1, still exact


def test_nash_mtl_no_solution_is_still_well_defined():
    g = np.array([[1.0, 0.0], [-1.0, 0.0]])  # direct conflict: no d improves both
    w = NashMTL(max_norm=0).weights(gram(g)).numpy()
    assert np.isfinite(w).all() and (w > 0).all()
    assert np.allclose(w[0], w[1])


# ---------------------------------------------------------------- Aligned-MTL


def test_aligned_mtl_hand_case_and_scale_modes():
    # K = diag(1, 4): B = sigma diag(1, 1/2)
    assert np.allclose(AlignedMTL().weights(gram(ORTHO)).numpy(), [1.0, 0.5])
    assert np.allclose(AlignedMTL(scale_mode="median").weights(gram(ORTHO)).numpy(), [1.0, 0.5])  # lower median
    s = math.sqrt(2.5)
    assert np.allclose(AlignedMTL(scale_mode="rmse").weights(gram(ORTHO)).numpy(), [s, s / 2])
    with pytest.raises(ValueError):
        AlignedMTL(scale_mode="max")


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("t,p", [(3, 5), (4, 4), (3, 2)])  # (3, 2): rank-deficient Gramian
def test_aligned_mtl_balanced_matrix_has_equal_singular_values(mode, t, p):
    g = conflicting(t, p, t * 10 + p)
    agg = AlignedMTL(scale_mode=mode)
    k = gram(g).numpy()
    b = agg.balance_matrix(k)
    sv = np.linalg.svd(g.T @ b, compute_uv=False)
    rank = np.linalg.matrix_rank(g)
    lam = np.sort(np.linalg.eigvalsh(k))[::-1][:rank]
    sigma = {"min": lam.min(), "median": np.sort(lam)[(rank - 1) // 2], "rmse": lam.mean()}[mode] ** 0.5
    assert np.allclose(sv[:rank], sigma, rtol=1e-8)
    assert np.allclose(sv[rank:], 0.0, atol=1e-8)
    assert np.allclose(agg.weights(gram(g)).numpy(), b.sum(1))


# ---------------------------------------------------------------- UPGrad


def test_upgrad_hand_case():
    # g1 onto {v·g2 >= 0}: g1 + 0.4 g2; g2 onto {v·g1 >= 0}: g2 + 0.5 g1; mean of the two
    w = UPGrad().weights(gram(CONFLICT)).numpy()
    assert np.allclose(w, [0.75, 0.7])
    assert np.allclose(UPGrad().weights(gram(ORTHO)).numpy(), [0.5, 0.5])
    assert np.allclose(UPGrad().weights(gram(ALIGNED)).numpy(), [0.5, 0.5])


def test_upgrad_is_the_mean_without_conflict():
    g = np.abs(rand_grads(4, 6, 0))  # all dot products >= 0
    assert np.allclose(update(UPGrad(), g), g.mean(0))


def _dual_cone_projection(g: np.ndarray, t: int) -> np.ndarray:
    cons = [{"type": "ineq", "fun": lambda v: g @ v, "jac": lambda v: g}]
    res = minimize(lambda v: ((v - g[t]) ** 2).sum(), g[t], jac=lambda v: 2 * (v - g[t]), constraints=cons,
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return res.x


@pytest.mark.parametrize("t,p,seed", [(3, 3, 0), (3, 5, 1), (5, 6, 2), (4, 2, 3)])
def test_upgrad_is_non_conflicting_and_matches_direct_projection(t, p, seed):
    g = conflicting(t, p, seed)
    d = update(UPGrad(), g)
    scale = (g**2).sum()
    assert (g @ d >= -1e-10 * scale).all()
    ref = np.mean([_dual_cone_projection(g, i) for i in range(t)], 0)
    assert np.allclose(d, ref, atol=1e-6)


# ---------------------------------------------------------------- GradVac


def test_gradvac_with_zero_targets_is_pcgrad_on_the_first_step():
    for seed in range(3):
        g = conflicting(4, 5, seed)
        assert np.allclose(GradVac(seed=seed).weights(gram(g)).numpy(), PCGrad(seed=seed).weights(gram(g)).numpy())


def test_gradvac_hand_formula_and_ema():
    g = np.array([[1.0, 0.0], [0.0, 1.0]])  # cos = 0
    agg = GradVac()
    assert agg.beta == 0.01
    agg.load_state_dict({"targets": torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64),
                         "generator": torch.Generator().manual_seed(0).get_state()})
    w = agg.weights(gram(g)).numpy()
    # g1' = g1 + |g1| (0.5·1 − 0·sqrt(0.75)) / (|g2| sqrt(0.75)) g2; pair (2, 1) has target 0: unchanged
    coef = 0.5 / math.sqrt(0.75)
    assert np.allclose(w, [1.0, 1.0 + coef])
    g1p = g[0] + coef * g[1]
    assert g1p @ g[1] / np.linalg.norm(g1p) == pytest.approx(0.5)  # the target cosine is reached
    assert np.allclose(agg.targets, [[0.0, 0.99 * 0.5], [0.0, 0.0]])  # EMA with the observed cos 0


def test_gradvac_targets_follow_observed_cosines():
    g = np.array([[1.0, 0.0], [1.0, 1.0]])  # cos = 1/sqrt 2, no change while targets stay below
    agg = GradVac(beta=0.5)
    for _ in range(3):
        assert np.allclose(agg.weights(gram(g)).numpy(), [1.0, 1.0])
    assert np.allclose(agg.targets, (1 - 0.5**3) / math.sqrt(2) * (1 - np.eye(2)))
    with pytest.raises(ValueError, match="2 tasks"):
        agg.weights(gram(rand_grads(3, 3, 0)))


# ---------------------------------------------------------------- GradDrop


def test_graddrop_keeps_everything_when_signs_agree():
    g = torch.rand(3, 100, dtype=torch.float64) + 0.1
    assert torch.allclose(graddrop(g, generator=torch.Generator().manual_seed(0)), g.sum(0))
    assert torch.allclose(graddrop(-g, generator=torch.Generator().manual_seed(0)), -g.sum(0))


def test_graddrop_is_seeded_and_follows_sign_purity():
    n = 20000
    g = torch.stack([torch.full((n,), 3.0), torch.full((n,), -1.0)])  # P = 0.5 (1 + 2/4) = 0.75
    out1 = graddrop(g, generator=torch.Generator().manual_seed(1))
    out2 = graddrop(g, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, graddrop(g, generator=torch.Generator().manual_seed(2)))
    assert set(out1.unique().tolist()) == {3.0, -1.0}  # exactly one sign survives per element
    assert (out1 == 3.0).double().mean().item() == pytest.approx(0.75, abs=0.02)
    assert torch.allclose(graddrop(g, leak=1.0), g.sum(0))  # full leak: the plain sum
    half = graddrop(g, leak=[0.5, 0.0], generator=torch.Generator().manual_seed(1))
    assert torch.allclose(half, torch.where(out1 == 3.0, torch.tensor(3.0), torch.tensor(1.5 - 1.0)))


def test_graddrop_activation_signs_and_batch_sum():
    # one element, batch of 2 with activation signs (+, -): signed task sums are 0 and -2 -> P = 0,
    # so only the task with negative signed gradient survives, for the whole batch
    g = torch.tensor([[[1.0], [1.0]], [[-1.0], [1.0]]])
    a = torch.tensor([[2.0], [-3.0]])
    out = graddrop(g, signs_source=a, batch=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, g[1])
    with pytest.raises(ValueError, match="signs_source"):
        graddrop(g, signs_source=torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        graddrop(torch.tensor([[float("nan")]]))


def test_zero_gradient_hand_cases():
    g = np.array([[1.0, 0.0], [-0.5, 1.0], [0.0, 0.0]])
    # MGDA: 0 is in the hull, so the min-norm point is 0, reached on the zero gradient
    assert np.allclose(MGDA().weights(gram(g)).numpy(), [0.0, 0.0, 1.0])
    # UPGrad: the zero gradient projects to 0 and constrains nothing; the others as in the hand case
    w = UPGrad().weights(gram(g)).numpy()
    assert np.allclose(w, [1.5 / 3, 1.4 / 3, 1 / 3])
    # Nash-MTL: the zero task gets weight 0, the others solve K α = 1/α among themselves
    a = NashMTL(max_norm=0).weights(gram(g)).numpy()
    assert a[2] == 0.0 and np.allclose(a[:2] * (gram(g[:2]).numpy() @ a[:2]), 1.0)


@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_nash_mtl_converges_at_default_iterations_for_unequal_norms(spread):
    for seed in range(10):
        g = rand_grads(6, 12, seed) + 0.5
        g *= 10.0 ** np.random.default_rng(seed).uniform(-spread, spread, (6, 1))
        alpha = NashMTL(max_norm=0).weights(gram(g)).numpy()  # cold start, optim_niter = 20
        assert np.allclose(alpha * (gram(g).numpy() @ alpha), 1.0, atol=1e-9)


# ---------------------------------------------------------------- Nash-MTL every N steps


def test_nash_mtl_every_n_offers_its_weights_between_updates_without_a_gramian():
    g1, g2 = rand_grads(3, 5, 1) + 0.5, rand_grads(3, 5, 2) + 0.5
    agg = NashMTL(max_norm=0, update_weights_every=3)
    assert agg.reuse(3) is None  # no α yet: the first call needs K
    a1 = agg.weights(gram(g1)).numpy()
    for _ in range(2):  # the two calls in between: α offered, the step counter moves on `reused`
        assert np.array_equal(agg.reuse(3), a1)
        assert agg.reuse(3) is not None  # asking does not change the state
        assert agg.reused(123.0) == 1.0  # max_norm = 0: no scaling
    assert agg.reuse(3) is None  # the third call recomputes
    a4 = agg.weights(gram(g2)).numpy()
    assert np.allclose(a4 * (gram(g2).numpy() @ a4), 1.0, atol=1e-9)
    clipped = NashMTL(max_norm=1.0, update_weights_every=2)
    clipped.weights(gram(g1))
    assert clipped.reused(4.0) == pytest.approx(1.0 / (4.0 + 1e-6)) and clipped.reuse(3) is None
    assert NashMTL().reuse(3) is None and MGDA().reuse(3) is None  # every step needs K for the others
    with pytest.raises(NotImplementedError):
        MGDA().reused(1.0)


def test_nash_mtl_every_n_state_round_trip_mid_cycle():
    g = rand_grads(3, 5, 3) + 0.5
    agg = NashMTL(update_weights_every=4)
    agg.weights(gram(g))
    agg.reused(0.5)
    fresh = NashMTL(update_weights_every=4)
    fresh.load_state_dict(agg.state_dict())
    assert np.array_equal(fresh.reuse(3), agg.reuse(3))
    fresh.reused(0.5), fresh.reused(0.5)
    assert fresh.reuse(3) is None


# ---------------------------------------------------------------- FairGrad


def test_fairgrad_hand_cases():
    # K = diag(1, 4): w_t = K_tt^(-α/(1+α)); the update is T w, unclipped with max_norm = 0
    for alpha in (0.5, 1.0, 2.0, 10.0):
        w = FairGrad(alpha=alpha, max_norm=0).weights(gram(ORTHO)).numpy()
        assert np.allclose(w, 2 * np.array([1.0, 4.0 ** (-alpha / (1 + alpha))]), rtol=1e-10)
    # the release's max-norm step: T w scaled to norm <= 1, as clip_grad_norm_(max_norm=1)
    w = FairGrad(alpha=2.0).weights(gram(ORTHO)).numpy()
    raw = 2 * np.array([1.0, 4.0 ** (-2 / 3)])
    assert np.allclose(w, raw / (np.linalg.norm(raw @ ORTHO) + 1e-6))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("t,p,seed", [(2, 3, 0), (3, 8, 1), (5, 8, 2), (8, 20, 3)])
def test_fairgrad_solves_the_alpha_fair_equation(alpha, t, p, seed):
    g = (rand_grads(t, p, seed) + 0.5) * 10.0 ** np.random.default_rng(seed).uniform(-2, 2, (t, 1))
    k = gram(g).numpy()
    w = FairGrad(alpha=alpha, max_norm=0).weights(gram(g)).numpy() / t
    assert (w > 0).all()
    assert np.allclose((k @ w) * w ** (1 / alpha), 1.0, atol=1e-9)  # K w = w^(-1/α)
    # scaling K by c scales w by c^(-α/(1+α))
    w3 = FairGrad(alpha=alpha, max_norm=0).weights(gram(3.0 * g)).numpy() / t
    assert np.allclose(w3, w * 9.0 ** (-alpha / (1 + alpha)), rtol=1e-8)


def test_fairgrad_alpha_one_is_proportional_fairness_the_nash_solution():
    for seed in range(5):
        g = rand_grads(4, 9, seed) + 0.5
        k = gram(g).numpy()
        w = FairGrad(alpha=1.0, max_norm=0).weights(gram(g)).numpy()
        assert np.allclose(w, 4 * nash_alpha(k), rtol=1e-9)
        # proportional fairness: d maximises Σ log(g_t·d) on the sphere of its own norm
        d = w @ g
        best = np.log(g @ d).sum()
        rng = np.random.default_rng(seed)
        for _ in range(200):
            e = d + 0.05 * np.linalg.norm(d) * rng.standard_normal(d.shape)
            e *= np.linalg.norm(d) / np.linalg.norm(e)
            if (g @ e > 0).all():
                assert np.log(g @ e).sum() <= best + 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_fairgrad_tends_to_max_min_fairness_as_alpha_grows(seed):
    # α -> ∞: K w = 1 on the support, i.e. the direction maximising min_t g_t·d/|d| (MGDA's)
    g = rand_grads(5, 7, seed) + 0.3
    mgda = MGDA().weights(gram(g)).numpy() @ g
    errors = []
    for alpha in (10.0, 1e3, 1e6):
        d = FairGrad(alpha=alpha, max_norm=0).weights(gram(g)).numpy() @ g
        errors.append(1.0 - d @ mgda / (np.linalg.norm(d) * np.linalg.norm(mgda)))
    assert errors[-1] < 1e-10 and errors[0] > errors[1] > errors[2] - 1e-12
    d = fair_weights(gram(g).numpy(), 1e9) @ g
    rates = g @ d
    on = fair_weights(gram(g).numpy(), 1e9) > 0
    assert np.allclose(rates[on], 1.0, atol=1e-6) and (rates[~on] >= 1.0 - 1e-6).all()


def test_fairgrad_bad_options_and_degenerate_gramians():
    for bad in (0.0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match="alpha"):
            FairGrad(alpha=bad)
    with pytest.raises(ValueError, match="max_norm"):
        FairGrad(max_norm=-1.0)
    # a zero gradient gets weight 0; the others solve the equation among themselves
    g = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    w = FairGrad(alpha=2.0, max_norm=0).weights(gram(g)).numpy()
    assert w[1] == 0.0 and np.allclose(w[[0, 2]], 3 * np.array([1.0, 4.0 ** (-2 / 3)]))
    # direct conflict: no solution exists; the regularised problem gives equal, finite weights
    w = FairGrad(max_norm=0).weights(gram(np.array([[1.0, 0.0], [-1.0, 0.0]]))).numpy()
    assert np.isfinite(w).all() and (w > 0).all() and w[0] == pytest.approx(w[1])
    assert FairGrad().weights(torch.zeros(3, 3, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- SDMGrad


def test_simplex_projection_is_the_euclidean_projection():
    assert np.allclose(simplex_projection(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    assert np.allclose(simplex_projection(np.array([2.0, 0.0])), [1.0, 0.0])
    assert np.allclose(simplex_projection(np.array([1.0, 1.0, 1.0])), [1 / 3] * 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = 3 * rng.standard_normal(5)
        w = simplex_projection(v)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        for _ in range(50):  # no point of the simplex is closer to v
            u = rng.dirichlet(np.ones(5))
            assert np.linalg.norm(w - v) <= np.linalg.norm(u - v) + 1e-12


def _sdmgrad_reference(k: np.ndarray, w: np.ndarray, lamda: float, niter: int, lr: float) -> np.ndarray:
    """The release's inner loop written with torch.optim.SGD (momentum 0.5) and the simplex projection."""
    k = torch.from_numpy(k / np.mean(np.sqrt(np.diag(k) + 1e-4)) ** 2)
    wt = torch.tensor(w, requires_grad=True)
    opt = torch.optim.SGD([wt], lr=lr, momentum=0.5)
    for _ in range(niter):
        opt.zero_grad()
        wt.grad = k @ wt.detach() + lamda * k.mean(dim=1)
        opt.step()
        wt.data.copy_(torch.from_numpy(simplex_projection(wt.detach().numpy())))
    return wt.detach().numpy()


def test_sdmgrad_follows_the_release_step_and_keeps_w_across_calls():
    gs = [conflicting(3, 6, s) for s in (1, 2, 3)]
    agg = SDMGrad(max_norm=0)
    w_ref = np.full(3, 1 / 3)
    for g in gs:
        out = agg.weights(gram(g)).numpy()
        w_ref = _sdmgrad_reference(gram(g).numpy(), w_ref, 0.3, 20, 10.0)
        assert np.allclose(agg.simplex_weights, w_ref, atol=1e-12)
        assert np.allclose(out, 3 * (w_ref + 0.3 / 3) / 1.3, atol=1e-12)  # T (w + λ/T)/(1 + λ)


@pytest.mark.parametrize("lamda", [0.0, 0.3, 2.0])
def test_sdmgrad_minimises_its_direction_oriented_objective(lamda):
    # with enough small steps, w is argmin over the simplex of ½|G w + λ g0|²
    g = conflicting(4, 6, 11)
    k = gram(g).numpy()
    agg = SDMGrad(lamda=lamda, niter=3000, lr=0.05, momentum=0.0, max_norm=0)
    agg.weights(gram(g))
    w = agg.simplex_weights
    g0 = g.mean(0)

    def objective(v):
        return 0.5 * np.linalg.norm(v @ g + lamda * g0) ** 2

    res = minimize(objective, np.full(4, 0.25), method="SLSQP", bounds=[(0, 1)] * 4,
                   constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}], options={"ftol": 1e-15})
    assert objective(w) <= res.fun + 1e-9 * (1 + res.fun)
    if lamda == 0.0:  # λ = 0: MGDA's min-norm point
        assert np.allclose(w @ g, MGDA().weights(gram(g)).numpy() @ g, atol=1e-6)
    assert k.shape == (4, 4)


def test_sdmgrad_large_lambda_is_the_average_gradient():
    g = conflicting(3, 5, 4)
    w = SDMGrad(lamda=1e8, max_norm=0).weights(gram(g)).numpy()
    assert np.allclose(w, 1.0, atol=1e-7)  # T (w + λ/T)/(1 + λ) -> 1: the sum of the gradients


def test_sdmgrad_objective_sampling_is_seeded_and_zeroes_the_others():
    g = conflicting(6, 8, 5)
    a, b = SDMGrad(sample_tasks=2, seed=3), SDMGrad(sample_tasks=2, seed=3)
    kept = []
    for _ in range(30):
        wa, wb = a.weights(gram(g)), b.weights(gram(g))
        assert torch.equal(wa, wb)  # same seed, same draws
        kept.append(int((wa > 0).sum()))
        assert kept[-1] >= 1  # never an empty sample
    assert min(kept) < 6 and 1.0 < np.mean(kept) < 4.0  # about n = 2 of 6 tasks kept, never all every time
    assert not all(torch.equal(SDMGrad(sample_tasks=2, seed=4).weights(gram(g)), a.weights(gram(g))) for _ in range(3))
    full = SDMGrad(sample_tasks=6)
    assert torch.equal(full.weights(gram(g)), SDMGrad().weights(gram(g)))  # n >= T: every task


def test_sdmgrad_bad_options():
    for kwargs in ({"lamda": -1.0}, {"niter": 0}, {"lr": 0.0}, {"momentum": 1.0}, {"max_norm": -1.0}, {"sample_tasks": 0}):
        with pytest.raises(ValueError):
            SDMGrad(**kwargs)
    agg = SDMGrad()
    agg.weights(gram(conflicting(3, 4, 0)))
    with pytest.raises(ValueError, match="holds weights for 3 tasks"):
        agg.weights(gram(conflicting(4, 4, 0)))


# ---------------------------------------------------------------- NTKMTL


def test_ntkmtl_weights_are_the_trace_over_each_tasks_ntk_eigenvalue():
    g = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # λ_t = |g_t|² = 1, 4, 2; trace 7
    for p in (0.0, 0.5, 0.75, 1.0):
        w = NTKMTL(ntk_exp=p, max_norm=0).weights(gram(g)).numpy()
        assert np.allclose(w, 3 * (7.0 / np.array([1.0, 4.0, 2.0])) ** p)
    # p = 1/2 balances the weighted gradients: every |w_t g_t| is T·√(trace K)
    w = NTKMTL(ntk_exp=0.5, max_norm=0).weights(gram(g)).numpy()
    assert np.allclose(np.linalg.norm(w[:, None] * g, axis=1), 3 * np.sqrt(7.0))
    clipped = NTKMTL().weights(gram(g)).numpy()
    assert np.linalg.norm(clipped @ g) == pytest.approx(1.0, rel=1e-5)


def test_ntkmtl_zero_gradient_and_bad_options():
    g = np.array([[1.0, 0.0], [0.0, 0.0]])
    w = NTKMTL(max_norm=0).weights(gram(g)).numpy()
    assert w[1] == 0.0 and w[0] == pytest.approx(2.0)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="ntk_exp"):
            NTKMTL(ntk_exp=bad)
