"""crfrnn.densecrf / crfrnn.utils against pydensecrf2 (the reference implementation they replace) and against
the reference outputs shipped with pydensecrf's own example, on generated scenes and (with ../shared) real images."""
import warnings

import numpy as np
import pytest
import torch

import crfrnn.densecrf as cd
import crfrnn.utils as cu

from conftest import CUDA, DATA, image_pairs

EXAMPLES = DATA / "pydensecrf-examples"


def _pd():
    return pytest.importorskip("pydensecrf.densecrf")


def _pdu():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.utils as pdu

    return pdu


def _noisy_softmax(mask, n_labels, seed, strength=2.0, noise=1.5):
    """(L, H, W) float32 probabilities: ground truth one-hot logits plus Gaussian noise, softmaxed."""
    rng = np.random.default_rng(seed)
    lab = mask.astype(np.int64)
    logits = strength * np.eye(n_labels)[lab].transpose(2, 0, 1) + rng.normal(0, noise, (n_labels,) + lab.shape)
    p = np.exp(logits - logits.max(0))
    return np.ascontiguousarray(p / p.sum(0), dtype=np.float32)


def _problem(n_pixels_hw=None, start=0, seed=0, source="scene"):
    """(name, image (H, W, 3) uint8, labels (H, W), noisy softmax (21, H, W)) of one image of ``source``
    (conftest.image_pairs: a generated scene, or the VOC sample), cut to its top-left ``n_pixels_hw``."""
    name, img, mask = image_pairs(source, count=1, start=start)[0]
    mask = mask.astype(np.int64)
    mask[mask == 255] = 0
    if n_pixels_hw is not None:
        h, w = n_pixels_hw
        img, mask = np.ascontiguousarray(img[:h, :w]), mask[:h, :w]
    return name, img, mask, _noisy_softmax(mask, 21, seed)


def _inference_on_one_and_two_threads(d, n_iterations):
    """``d.inference(n_iterations)`` with 1 and with 2 numba threads (the caller's thread count restored)."""
    import numba

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = d.inference(n_iterations)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        return one, d.inference(n_iterations)
    finally:
        numba.set_num_threads(before)


# --------------------------------------------------------------------------------- pydensecrf's example
def _example_inputs(stem, bgr):
    """pydensecrf's examples/inference.py, step by step: colours -> labels with 0 = unknown (black)."""
    from PIL import Image

    k = stem.split("-")[0]
    img = np.array(Image.open(EXAMPLES / f"im{k}.png").convert("RGB"))
    anno_rgb = np.array(Image.open(EXAMPLES / f"anno{stem}.png").convert("RGB")).astype(np.uint32)
    out = np.array(Image.open(EXAMPLES / f"out{stem}.png").convert("RGB"))
    if bgr:  # cv2.imread gives BGR: the image features and the colour packing both follow it
        img, anno_rgb, out = np.ascontiguousarray(img[..., ::-1]), anno_rgb[..., ::-1], out[..., ::-1]
    anno_lbl = anno_rgb[:, :, 0] + (anno_rgb[:, :, 1] << 8) + (anno_rgb[:, :, 2] << 16)
    colors, labels = np.unique(anno_lbl, return_inverse=True)
    labels = labels.reshape(-1)
    has_unk = 0 in colors
    if has_unk:
        colors = colors[1:]
    colorize = np.empty((len(colors), 3), np.uint8)
    colorize[:, 0] = colors & 0x0000FF
    colorize[:, 1] = (colors & 0x00FF00) >> 8
    colorize[:, 2] = (colors & 0xFF0000) >> 16
    n_labels = len(set(labels.flat)) - int(has_unk)
    return img, labels, has_unk, n_labels, colorize, out


def _example_map(dcrf, utils, img, labels, has_unk, n_labels, use_2d):
    if use_2d:
        d = dcrf.DenseCRF2D(img.shape[1], img.shape[0], n_labels)
        d.setUnaryEnergy(utils.unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=has_unk))
        d.addPairwiseGaussian(sxy=(3, 3), compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        d.addPairwiseBilateral(sxy=(80, 80), srgb=(13, 13, 13), rgbim=img, compat=10,
                               kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    else:
        d = dcrf.DenseCRF(img.shape[1] * img.shape[0], n_labels)
        d.setUnaryEnergy(utils.unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=has_unk))
        feats = utils.create_pairwise_gaussian(sdims=(3, 3), shape=img.shape[:2])
        d.addPairwiseEnergy(feats, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        feats = utils.create_pairwise_bilateral(sdims=(80, 80), schan=(13, 13, 13), img=img, chdim=2)
        d.addPairwiseEnergy(feats, compat=10, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    return np.argmax(d.inference(5), axis=0)


# out1..3.png were made with skimage's RGB reading, out1-b.png with OpenCV's BGR one (pydensecrf2 reproduces
# each exactly that way); the example's default path is the generic DenseCRF + utils one (use_2d = False).
@pytest.mark.parametrize("stem,bgr", [("1", False), ("2", False), ("3", False), ("1-b", True)])
def test_pydensecrf_example_matches_reference_outputs(stem, bgr):
    pd = _pd()
    pdu = _pdu()
    if not (EXAMPLES / f"out{stem}.png").exists():
        pytest.skip(f"pydensecrf examples not found at {EXAMPLES}")
    img, labels, has_unk, n_labels, colorize, out = _example_inputs(stem, bgr)
    ref_map = _example_map(pd, pdu, img, labels, has_unk, n_labels, use_2d=False)
    our_map = _example_map(cd, cu, img, labels, has_unk, n_labels, use_2d=False)
    out = out.reshape(-1, 3)
    agree_pd = float((our_map == ref_map).mean())
    ref_vs_out = float((colorize[ref_map] == out).all(1).mean())
    ours_vs_out = float((colorize[our_map] == out).all(1).mean())
    assert agree_pd >= 0.99, (stem, agree_pd)
    assert ours_vs_out >= ref_vs_out - 0.005, (stem, ours_vs_out, ref_vs_out)
    # not a tautology: the result is far from the raw annotation (unknown pixels filled, labels moved)
    annotated = labels - 1 if has_unk else labels  # -1 = unknown
    assert (our_map != annotated).mean() > 0.01 and len(np.unique(our_map)) == n_labels


def test_pydensecrf_example_2d_path():
    pd = _pd()
    if not (EXAMPLES / "out1.png").exists():
        pytest.skip(f"pydensecrf examples not found at {EXAMPLES}")
    img, labels, has_unk, n_labels, colorize, out = _example_inputs("1", False)
    ref_map = _example_map(pd, _pdu(), img, labels, has_unk, n_labels, use_2d=True)
    our_map = _example_map(cd, cu, img, labels, has_unk, n_labels, use_2d=True)
    assert (our_map == ref_map).mean() >= 0.99
    assert (colorize[our_map] == out.reshape(-1, 3)).all(1).mean() >= 0.99


# ------------------------------------------------------------------------- whole images (scenes and VOC)
@pytest.mark.parametrize("start,all_labels", [(0, True), (1, True), (2, False)])
def test_softmax_unaries_match_pydensecrf(image_source, start, all_labels):
    pd = _pd()
    name, img, mask = image_pairs(image_source, count=1, start=start)[0]
    lab = mask.astype(np.int64)
    lab[lab == 255] = 0
    if not all_labels:  # only the classes present, relabelled 0..K-1
        _, lab = np.unique(lab, return_inverse=True)
        lab = lab.reshape(mask.shape)
    n_labels = 21 if all_labels else int(lab.max()) + 1
    probs = _noisy_softmax(lab, n_labels, seed=start)
    U = cu.unary_from_softmax(probs)
    h, w = lab.shape
    maps = []
    for dcrf in (pd, cd):
        d = dcrf.DenseCRF2D(w, h, n_labels)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
        maps.append(np.argmax(d.inference(5), axis=0))
    ref, ours = maps
    assert (ours == ref).mean() >= 0.99, name
    # not a tautology: the CRF changed many pixels of the noisy unary's arg max, towards the ground truth
    raw = U.argmin(0)  # the unary alone: least energy
    assert (ours != raw).mean() > 0.05, name
    assert (ours == lab.reshape(-1)).mean() > (raw == lab.reshape(-1)).mean() + 0.05, name


# ----------------------------------------------------------------------------- variants, numerically
NORMS = ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"]


@pytest.mark.parametrize("norm,kernel", [(n, "DIAG_KERNEL") for n in NORMS] + [("NORMALIZE_SYMMETRIC", "FULL_KERNEL"),
                                                                          ("NORMALIZE_AFTER", "CONST_KERNEL")])
def test_variants_match_pydensecrf(norm, kernel):
    """Every compatibility kind (Potts +/-, per-label vector, non-symmetric matrix) under each normalisation:
    marginals, step-by-step inference and the KL objective agree with pydensecrf."""
    pd = _pd()
    _, img, mask, probs = _problem((60, 80), start=3)
    h, w = mask.shape
    U = cu.unary_from_softmax(probs)
    rng = np.random.default_rng(1)
    s = np.float32(1e-3 if norm == "NO_NORMALIZATION" else 1.0)  # unnormalised kernels sum to ~hundreds
    terms = [  # (kind, width(s), compat)
        ("gauss", (3, 4), s * 3.0),
        ("gauss", 9, s * -1.0),
        ("bil", ((60, 50), (13, 10, 15)), s * np.linspace(-10, 2, 21).astype(np.float32)),
        ("bil", (30, 20), s * rng.normal(size=(21, 21)).astype(np.float32)),  # not symmetric: symmetrised
    ]
    crfs = []
    for dcrf in (pd, cd):
        d = dcrf.DenseCRF2D(w, h, 21)
        d.setUnaryEnergy(U)
        k, nt = getattr(dcrf, kernel), getattr(dcrf, norm)
        for kind, widths, compat in terms:
            if kind == "gauss":
                d.addPairwiseGaussian(widths, compat, k, nt)
            else:
                d.addPairwiseBilateral(widths[0], widths[1], img, compat, k, nt)
        crfs.append(d)
    ref, ours = crfs
    q_ref, q_ours = np.array(ref.inference(5)), ours.inference(5)
    assert isinstance(q_ours, np.ndarray) and q_ours.shape == (21, h * w) and q_ours.dtype == np.float32
    np.testing.assert_allclose(q_ours, q_ref, atol=2e-5, rtol=0)
    assert np.abs(q_ours - np.array(ref.inference(0))).max() > 1e-2  # the pairwise terms act
    # step by step, with the KL objective at each step
    a = ref.startInference()
    b = ours.startInference()
    for _ in range(3):
        ka, kb = ref.klDivergence(a[0]), ours.klDivergence(b[0])
        assert kb == pytest.approx(ka, rel=1e-4, abs=1e-2)
        ref.stepInference(*a)
        ours.stepInference(*b)
    np.testing.assert_allclose(b[0], np.array(a[0]), atol=2e-5, rtol=0)
    np.testing.assert_allclose(b[0], np.array(ref.inference(3)), atol=2e-5, rtol=0)


def test_compat_conventions(image_source):
    """Potts w == diagonal -w == matrix w(1 - I) (signs), a matrix acts through its symmetric part."""
    pd = _pd()
    _, img, mask, probs = _problem((60, 80), start=4, source=image_source)
    h, w = mask.shape
    U = cu.unary_from_softmax(probs)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(21, 21)).astype(np.float32)
    sym = np.ascontiguousarray(0.5 * (m + m.T))

    def q(dcrf, compat):
        d = dcrf.DenseCRF2D(w, h, 21)
        d.setUnaryEnergy(U)
        d.addPairwiseBilateral(40, 13, img, compat)
        return np.array(d.inference(3))

    for dcrf in (pd, cd):
        potts = q(dcrf, 5.0)
        np.testing.assert_allclose(q(dcrf, np.full(21, -5.0, np.float32)), potts, atol=1e-5)
        potts_matrix = np.ascontiguousarray(5 * (1 - np.eye(21, dtype=np.float32)))
        np.testing.assert_allclose(q(dcrf, potts_matrix), potts, atol=1e-5)
        np.testing.assert_allclose(q(dcrf, m), q(dcrf, sym), atol=1e-5)
        assert np.abs(q(dcrf, np.full(21, 5.0, np.float32)) - potts).max() > 0.05  # the sign matters
    # positive Potts smooths: fewer label changes between horizontal neighbours than the unary alone
    lab_crf = q(cd, 5.0).argmax(0).reshape(h, w)
    lab_raw = U.argmin(0).reshape(h, w)  # the unary alone: least energy
    assert (lab_crf[:, 1:] != lab_crf[:, :-1]).sum() < 0.75 * (lab_raw[:, 1:] != lab_raw[:, :-1]).sum()


def test_generic_features_and_no_unary():
    """addPairwiseEnergy with N-D utils features (a 3-D volume, 2 channels) matches pydensecrf; no unary = uniform."""
    pd = _pd()
    rng = np.random.default_rng(0)
    vol = (rng.random((6, 20, 25, 2)) * 255).astype(np.uint8)
    vol[:, :, 12:] //= 4
    n = 6 * 20 * 25
    probs = np.ascontiguousarray(rng.dirichlet(np.ones(4), size=n).T.reshape(4, 6, 20, 25), dtype=np.float32)
    U = cu.unary_from_softmax(probs, scale=0.9)

    def q(dcrf, sdims, schan):
        d = dcrf.DenseCRF(n, 4)
        d.setUnaryEnergy(U)
        d.addPairwiseEnergy(cu.create_pairwise_gaussian(sdims=(1, 2, 2), shape=(6, 20, 25)), compat=2)
        feats = cu.create_pairwise_bilateral(sdims=sdims, schan=schan, img=vol, chdim=3)
        d.addPairwiseEnergy(feats, compat=4, normalization=dcrf.NORMALIZE_AFTER)
        return np.array(d.inference(4))

    np.testing.assert_allclose(q(cd, (1.7, 4.3, 5.3), (19.7, 31.3)), q(pd, (1.7, 4.3, 5.3), (19.7, 31.3)), atol=2e-5)
    # "round" widths put some of these integer-valued points exactly on lattice rounding ties, which pydensecrf
    # (float32 elevation) and our lattice (float64) may break differently: small local differences only
    a, b = q(cd, (2, 5, 5), (20, 30)), q(pd, (2, 5, 5), (20, 30))
    assert np.abs(a - b).max() < 0.05 and (a.argmax(0) == b.argmax(0)).mean() >= 0.99
    empty = cd.DenseCRF(7, 3)
    np.testing.assert_allclose(empty.inference(2), np.full((3, 7), 1 / 3, np.float32), atol=1e-7)
    # zero iterations: softmax(-U), computed independently
    d = cd.DenseCRF(n, 4)
    d.setUnaryEnergy(U)
    e = np.exp(-U.astype(np.float64))
    np.testing.assert_allclose(d.inference(0), e / e.sum(0), atol=1e-6)


def test_constants_match_pydensecrf():
    pd = _pd()
    for name in ["DIAG_KERNEL", "CONST_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE",
                 "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"]:
        assert int(getattr(cd, name)) == int(getattr(pd, name)), name


def test_inputs_are_copied_not_modified():
    _, img, mask, probs = _problem((40, 50), start=5)
    U = cu.unary_from_softmax(probs)
    U0, img0 = U.copy(), img.copy()
    d = cd.DenseCRF2D(50, 40, 21)
    d.setUnaryEnergy(U)
    d.addPairwiseBilateral(20, 13, img, 5)
    q1 = d.inference(2)
    U[:] = 0  # editing the caller's array afterwards does not change the CRF (pydensecrf copies too)
    np.testing.assert_array_equal(d.inference(2), q1)
    np.testing.assert_array_equal(img, img0)
    U[:] = U0
    d2 = cd.DenseCRF2D(50, 40, 21)
    d2.setUnaryEnergy(U)
    d2.addPairwiseBilateral(20, 13, img, 5)
    np.testing.assert_array_equal(U, U0)
    t = torch.from_numpy(U.copy())  # a tensor's memory is not kept either
    d3 = cd.DenseCRF2D(50, 40, 21)
    d3.setUnaryEnergy(t)
    d3.addPairwiseBilateral(20, 13, img, 5)
    t.zero_()
    np.testing.assert_array_equal(d3.inference(2), q1)


def test_fused_mean_field_from_rows_equals_from_energies_and_checks_its_rows():
    """The entry DenseCRF uses (its unary kept as rows) against the one from (L, N) energies; bad rows are named."""
    from crfrnn.lattice.fused import fused_mean_field, fused_mean_field_rows, label_rows

    _, img, mask, probs = _problem((40, 50), start=5)
    U = cu.unary_from_softmax(probs)
    d = cd.DenseCRF2D(50, 40, 21)
    d.addPairwiseGaussian(3, 3)
    d.addPairwiseBilateral(20, 13, img, 5)
    stacked = d._fused_terms()
    want = fused_mean_field(torch.from_numpy(U), stacked, 3, energies=True)
    rows = label_rows(U, negate=True)
    torch.testing.assert_close(fused_mean_field_rows(rows, 21, stacked, 3), want, rtol=0, atol=0)
    wrong = (rows[:, :21].copy(), rows.astype(np.float64), rows[::2], rows[::2].copy(), np.asfortranarray(rows))
    for bad in wrong:  # labels' width, dtype, strided, too few points, column-major
        with pytest.raises(ValueError, match=r"logit_rows must be C-contiguous float32 of shape \(P, Cp\) = "
                                             r"\(2000, 24\) for the terms' 2000 points and 21 labels, got"):
            fused_mean_field_rows(bad, 21, stacked, 3)


@pytest.mark.parametrize("device", CUDA)
def test_device(device):
    _, img, mask, probs = _problem((60, 80), start=6)
    U = cu.unary_from_softmax(probs)
    qs = []
    for dev in ("cpu", device):
        d = cd.DenseCRF2D(80, 60, 21, device=dev)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(3, 3)
        d.addPairwiseBilateral(80, 13, img, 10)
        qs.append(d.inference(3))
    np.testing.assert_allclose(qs[1], qs[0], atol=1e-4)


# --------------------------------------------------------------------------------------------- refine
def test_refine_matches_pydensecrf_recipe(image_source):
    pd = _pd()
    name, img, mask, probs = _problem(start=7, source=image_source)
    h, w = mask.shape
    d = pd.DenseCRF2D(w, h, 21)
    d.setUnaryEnergy(_pdu().unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    ref = np.argmax(d.inference(5), axis=0).reshape(h, w)
    ours = cd.refine(img, probs)
    assert isinstance(ours, np.ndarray) and ours.shape == (h, w) and ours.dtype == np.int64
    assert (ours == ref).mean() >= 0.99, name
    # torch in, (3, H, W) image: a tensor out, the same labels
    t = cd.refine(torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(probs))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), ours)


# ------------------------------------------------------------------------------------------------ utils
def test_utils_identical_to_pydensecrf():
    pdu = _pdu()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(13, 17))
    for zero_unsure, n in ((True, 4), (False, 5)):
        a = pdu.unary_from_labels(labels, n, gt_prob=0.7, zero_unsure=zero_unsure)
        b = cu.unary_from_labels(labels, n, gt_prob=0.7, zero_unsure=zero_unsure)
        assert b.dtype == a.dtype == np.float32
        np.testing.assert_array_equal(b, a)
    sm = rng.dirichlet(np.ones(6), size=(9, 11)).transpose(2, 0, 1)
    sm[0, 0, 0] = 0.0
    for scale, clip in ((None, 1e-5), (0.8, 1e-5), (0.8, None), (None, 1e-3)):
        np.testing.assert_array_equal(cu.unary_from_softmax(sm, scale, clip), pdu.unary_from_softmax(sm, scale, clip))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(cu.softmax_to_unary(sm, 0.9), pdu.softmax_to_unary(sm, 0.9))
        np.testing.assert_array_equal(cu.compute_unary(labels, 4, 0.6), pdu.compute_unary(labels, 4, 0.6))
    for sdims, shape in (((3, 3), (13, 17)), ((1, 2, 3), (4, 5, 6)), ((2.5,), (7,))):
        np.testing.assert_array_equal(
            cu.create_pairwise_gaussian(sdims, shape), pdu.create_pairwise_gaussian(sdims, shape)
        )
    img = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    for sdims, schan, im, chdim in (
        ((80, 80), (13, 13, 13), img, 2),
        ((5, 7), 13, img, 2),
        ((5, 7), (10, 20, 30), img.transpose(2, 0, 1), 0),
        ((3, 4), 11, img[..., 0], -1),
    ):
        np.testing.assert_array_equal(
            cu.create_pairwise_bilateral(sdims, schan, im, chdim),
            pdu.create_pairwise_bilateral(sdims, schan, im, chdim),
        )
    # the 2-D helpers' documented equivalence: create_pairwise_gaussian((3, 3)) == addPairwiseGaussian(3) with
    # the axes swapped, so both CRFs agree
    feats = cu.create_pairwise_gaussian((3, 3), (13, 17))
    np.testing.assert_allclose(feats[::-1], np.stack(np.meshgrid(np.arange(17), np.arange(13)), 0).reshape(2, -1) / 3,
                               rtol=1e-6)


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    d = cd.DenseCRF2D(5, 4, 3)
    good_u = np.zeros((3, 20), np.float32)
    with pytest.raises(ValueError, match=r"unary energy u.*\(3, 20\).*\(20, 3\)"):
        d.setUnaryEnergy(np.zeros((20, 3), np.float32))
    with pytest.raises(ValueError, match=r"float32.*float64"):
        d.setUnaryEnergy(good_u.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        d.setUnaryEnergy(np.asfortranarray(good_u))
    with pytest.raises(TypeError, match="unary energy u must be a float32 numpy array"):
        d.setUnaryEnergy(good_u.tolist())
    bad = good_u.copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"unary energy u \(shape \(3, 20\)\) contains NaN or infinite"):
        d.setUnaryEnergy(bad)
    with pytest.raises(ValueError, match=r"rgbim.*\(4, 5, 3\).*\(5, 4, 3\)"):
        d.addPairwiseBilateral(3, 13, np.zeros((5, 4, 3), np.uint8), 5)
    with pytest.raises(ValueError, match="only works for RGB"):
        d.addPairwiseBilateral(3, 13, np.zeros((4, 5, 4), np.uint8), 5)
    with pytest.raises(ValueError, match="rgbim must be uint8"):
        d.addPairwiseBilateral(3, 13, np.zeros((4, 5, 3), np.float32), 5)
    with pytest.raises(ValueError, match=r"compat vector must have shape \(3,\).*\(4,\)"):
        d.addPairwiseGaussian(3, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"compat matrix must have shape \(3, 3\).*\(2, 2\)"):
        d.addPairwiseGaussian(3, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="dimension >2"):
        d.addPairwiseGaussian(3, np.ones((3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="compat must be a number"):
        d.addPairwiseGaussian(3, "potts")
    with pytest.raises(ValueError, match="sxy must be positive"):
        d.addPairwiseGaussian(0, 3)  # pydensecrf segfaults here
    with pytest.raises(ValueError, match=r"srgb must be a number or a sequence of 3"):
        d.addPairwiseBilateral(3, (13, 13), np.zeros((4, 5, 3), np.uint8), 5)
    with pytest.raises(ValueError, match="normalization must be one of"):
        d.addPairwiseGaussian(3, 3, normalization=7)
    with pytest.raises(ValueError, match=r"pairwise energy features.*\(\?, 20\).*\(2, 19\)"):
        d.addPairwiseEnergy(np.zeros((2, 19), np.float32), 3)
    with pytest.raises(ValueError, match=r"features.*NaN"):
        d.addPairwiseEnergy(np.full((2, 20), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match=r"Q must have shape.*\(3, 20\).*\(3, 19\)"):
        d.klDivergence(np.zeros((3, 19), np.float32))
    with pytest.raises(ValueError, match="n_iterations must be >= 0"):
        d.inference(-1)
    assert len(d._pairwise) == 0  # nothing half-added by the failures


def test_refine_bad_input():
    img = np.zeros((4, 5, 3), np.uint8)
    probs = np.full((3, 4, 5), 1 / 3, np.float32)
    assert cd.refine(img, probs).shape == (4, 5)
    with pytest.raises(ValueError, match=r"\(3, 6, 5\).*image of shape \(4, 5, 3\)"):
        cd.refine(img, np.full((3, 6, 5), 1 / 3, np.float32))
    with pytest.raises(ValueError, match=r"image of shape \(5, 4, 3\)"):
        cd.refine(np.zeros((5, 4, 3), np.uint8), probs)
    with pytest.raises(TypeError, match="image must be uint8"):
        cd.refine(img.astype(np.float32), probs)
    with pytest.raises(ValueError, match=r"probabilities must have shape \(L, H, W\), got \(4, 5\)"):
        cd.refine(img, probs[0])
    bad = probs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite and non-negative"):
        cd.refine(img, bad)


def test_utils_bad_input():
    with pytest.raises(ValueError, match="gt_prob"):
        cu.unary_from_labels(np.zeros(4, np.int64), 3, gt_prob=1.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\].*\[0, 7\]"):
        cu.unary_from_labels(np.array([0, 7]), 3, gt_prob=0.5)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        cu.unary_from_labels(np.zeros(4), 3, gt_prob=0.5)
    with pytest.raises(ValueError, match="scale"):
        cu.unary_from_softmax(np.ones((2, 3)) / 2, scale=2)
    with pytest.raises(ValueError, match=r"sdims has 2 entries but shape \(4, 5, 6\) has 3"):
        cu.create_pairwise_gaussian((1, 2), (4, 5, 6))
    with pytest.raises(ValueError, match="schan has 4 entries"):
        cu.create_pairwise_bilateral((1, 2), (1, 2, 3, 4), np.zeros((4, 5, 3), np.uint8), chdim=2)


# ------------------------------------------------------------------------- fused CPU path vs its twin
@pytest.mark.parametrize("n_labels", [1, 2, 9, 21, 30])
def test_fused_inference_matches_per_term_loop(n_labels):
    """The fused CPU mean field (all terms + softmax in one compiled pass per iteration) equals the
    per-term loop (one lattice filter call per term, torch softmax) for every compatibility kind,
    normalisation, feature dimension and label count (padding to whole SIMD registers included)."""
    _, img, mask, _ = _problem((45, 70), start=5)
    h, w = mask.shape
    rng = np.random.default_rng(n_labels)
    U = np.ascontiguousarray(rng.normal(0, 2, (n_labels, h * w)), dtype=np.float32)
    d = cd.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(U)
    d.addPairwiseGaussian(3, 3.0)
    d.addPairwiseBilateral(30, 13, img, np.linspace(-6, 1, n_labels).astype(np.float32),
                           normalization=cd.NORMALIZE_BEFORE)
    d.addPairwiseEnergy(np.ascontiguousarray(img[..., :1].reshape(1, -1).astype(np.float32) / 20), 2.0,
                        normalization=cd.NORMALIZE_AFTER)  # D = 1
    m = rng.normal(0, 1, (n_labels, n_labels)).astype(np.float32)
    d.addPairwiseBilateral(60, 20, img, m, normalization=cd.NO_NORMALIZATION)
    fused = d.inference(6)
    assert d._stacked is not None  # the fused path ran
    twin = d._infer_by_terms(-torch.from_numpy(U), 6).numpy()
    np.testing.assert_allclose(fused, twin, atol=3e-6, rtol=0)
    if n_labels > 1:
        assert np.abs(twin - d._infer_by_terms(-torch.from_numpy(U), 0).numpy()).max() > 0.05  # the terms act
    np.testing.assert_allclose(fused.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("n_labels", [1, 2, 9, 21])
@pytest.mark.parametrize("n_iterations", [0, 4])
def test_fused_map_labels_are_the_argmax_of_the_marginals(n_labels, n_iterations):
    """The labels the fused pass picks as it goes (``refine``'s path) are ``np.argmax`` of the marginals it
    returns, and of the per-term twin's where the twin's top two labels are not within rounding; ties
    (here: pairs of labels with equal unaries, so equal marginals) go to the first label, as in ``np.argmax``."""
    _, img, mask, _ = _problem((45, 70), start=5)
    h, w = mask.shape
    rng = np.random.default_rng(n_labels)
    U = rng.normal(0, 2, (n_labels, h * w)).astype(np.float32)
    if n_labels > 2:
        U[1] = U[0]  # exact ties, decided by the label order
    d = cd.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(U))
    d.addPairwiseGaussian(3, 3.0)
    d.addPairwiseBilateral(30, 13, img, 5.0)
    q = d.inference(n_iterations)
    labels = d._infer(n_iterations, labels=True).numpy()
    assert labels.dtype == np.int64 and labels.shape == (h * w,)
    np.testing.assert_array_equal(labels, q.argmax(0))
    if n_labels > 2:
        assert (labels == 0).any() and not (labels == 1).any()  # label 1 always ties with label 0
    twin = d._infer_by_terms(-torch.from_numpy(U), n_iterations).numpy()
    top2 = np.sort(twin, 0)[-2:]
    clear = (top2[-1] - top2[0]) > 1e-5 if n_labels > 1 else np.ones(h * w, bool)
    np.testing.assert_array_equal(labels[clear], twin.argmax(0)[clear])


def test_inference_lays_out_its_marginals_as_pydensecrf():
    """``inference`` returns ``(L, N)`` as the transpose of a contiguous ``(N, L)`` (a pixel's labels side by
    side), as pydensecrf's ``np.array(d.inference(n))`` is: ``np.argmax(Q, axis=0)``, the usual next line,
    then reads each pixel's labels together instead of copying ``Q`` first."""
    _, img, mask, _ = _problem((45, 70), start=5)
    h, w = mask.shape
    U = np.random.default_rng(0).normal(0, 2, (21, h * w)).astype(np.float32)
    try:
        import pydensecrf.densecrf as pd
    except ImportError:  # the layout is still checked; pydensecrf's only where installed
        pd = None
    layouts = {}
    for name, dcrf in (("crfrnn", cd), ("pydensecrf", pd)):
        if dcrf is None:
            continue
        d = dcrf.DenseCRF2D(w, h, 21)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(3, 3.0)
        d.addPairwiseBilateral(30, 13, img, 5.0)
        q = np.asarray(d.inference(3))
        layouts[name] = (q.shape, q.dtype, q.strides, q.flags["F_CONTIGUOUS"])
        np.testing.assert_array_equal(np.argmax(q, axis=0), np.argmax(np.ascontiguousarray(q), axis=0))
    assert layouts["crfrnn"] == ((21, h * w), np.float32, (4, 4 * 21), True)
    if "pydensecrf" in layouts:
        assert layouts["pydensecrf"] == layouts["crfrnn"]


def test_fused_inference_is_independent_of_thread_count():
    """Fixed splat copies summed in a fixed order: bit-identical marginals for 1 and 2 threads."""
    _, img, mask, probs = _problem((60, 80), start=2)
    h, w = mask.shape
    d = cd.DenseCRF2D(w, h, 21)
    d.setUnaryEnergy(cu.unary_from_softmax(probs))
    d.addPairwiseGaussian(3, 3)
    d.addPairwiseBilateral(80, 13, img, 10)
    one, two = _inference_on_one_and_two_threads(d, 5)
    np.testing.assert_array_equal(one, two)


def test_fused_softmax_accuracy_and_floor():
    """Zero iterations = softmax(-U) by the fused pass's own exp: float32 accuracy against float64, and
    tiny marginals stay positive (floored at 2^-60 / L) instead of underflowing to 0."""
    rng = np.random.default_rng(3)
    n, L = 5000, 21
    U = np.ascontiguousarray(rng.uniform(0, 120, (L, n)), dtype=np.float32)
    d = cd.DenseCRF(n, L)
    d.setUnaryEnergy(U)
    d.addPairwiseEnergy(np.ascontiguousarray(rng.normal(size=(2, n)), dtype=np.float32), 0.0)
    q = d.inference(0)
    e = np.exp(-(U.astype(np.float64) - U.min(0)))
    ref = e / e.sum(0)
    big = ref > 1e-17
    # float32 arguments as large as -120 carry ~1e-5 absolute rounding: compare with torch's float32 softmax
    f32 = torch.softmax(-torch.from_numpy(U), 0).numpy()
    assert np.abs(q[big] / ref[big] - 1).max() <= 2 * np.abs(f32[big] / ref[big] - 1).max() + 1e-6
    assert q.min() >= 0.99 * 2.0**-60 / L  # exp() floored at 2^-60, divided by a sum of at most L
    np.testing.assert_array_equal(q.argmax(0), ref.argmax(0))


@pytest.mark.parametrize("n_labels", [2, 7, 8, 9, 59])
def test_fused_simd_softmax_any_label_count(n_labels):
    """The fused pass's 8-lane softmax masks the padding lanes: zero iterations = softmax(-U) to float32
    accuracy against float64 for label counts below, at and above whole registers, and sums to 1."""
    rng = np.random.default_rng(n_labels)
    n = 3000
    U = np.ascontiguousarray(rng.uniform(0, 30, (n_labels, n)), dtype=np.float32)
    d = cd.DenseCRF(n, n_labels)
    d.setUnaryEnergy(U)
    d.addPairwiseEnergy(np.ascontiguousarray(rng.normal(size=(2, n)), dtype=np.float32), 1.0)
    q = d.inference(0)
    assert d._stacked is not None  # the fused path ran
    e = np.exp(-(U.astype(np.float64) - U.min(0)))
    ref = e / e.sum(0)
    big = ref > 1e-12
    assert np.abs(q[big] / ref[big] - 1).max() < 3e-5
    np.testing.assert_allclose(q.sum(0), 1.0, atol=2e-6)


@pytest.mark.parametrize("splat", ["default", "default, bilateral first", "scatter", "ranges"])
def test_fused_inference_on_voc_kernels_matches_twin_and_thread_count(splat, monkeypatch):
    """CRF-RNN's VOC kernels (θβ = 3) on a real image, with each term splatted as the fused pass chooses
    (``default``: the bilateral term by vertex ranges, the spatial one by scatter; the splat's private copies then
    hold only the spatial term's rows, or, with the bilateral term added first, every row up to the spatial
    term's), or every term by scatter into private copies (vertices shared by the copies all over the
    lattice, so their owner rule is exercised) or by vertex ranges (copies of no rows): the fused pass equals the
    per-term twin, and 1 and 2 threads give the same bits."""
    import crfrnn.lattice.fused as fused

    if not splat.startswith("default"):
        monkeypatch.setattr(fused, "_RANGED_PRIVATE_ROWS_PER_POINT", np.inf if splat == "scatter" else 0.0)
    chosen = []
    real = fused.splat_by_ranges
    monkeypatch.setattr(fused, "splat_by_ranges", lambda *a: chosen.append(real(*a)) or chosen[-1])
    _, img, mask, probs = _problem((120, 160), start=6, source="voc")
    h, w = mask.shape
    d = cd.DenseCRF2D(w, h, 21)
    U = cu.unary_from_softmax(probs)
    d.setUnaryEnergy(U)
    terms = [lambda: d.addPairwiseGaussian(3, 3), lambda: d.addPairwiseBilateral(160, 3, img, 5)]
    for add in terms[::-1] if "bilateral first" in splat else terms:
        add()
    one, two = _inference_on_one_and_two_threads(d, 5)
    expect = {"scatter": [False, False], "ranges": [True, True]}.get(splat, [False, True])
    expect = expect[::-1] if "bilateral first" in splat else expect
    assert [c.tolist() for c in chosen] == [expect, expect]  # the terms in the order added, once per call
    np.testing.assert_array_equal(one, two)
    twin = d._infer_by_terms(-torch.from_numpy(U), 5).numpy()
    np.testing.assert_allclose(one, twin, atol=3e-6, rtol=0)
    assert np.abs(twin - d._infer_by_terms(-torch.from_numpy(U), 0).numpy()).max() > 0.05  # the terms act


def test_splat_by_ranges_is_the_scatter_in_point_order_for_any_number_of_ranges():
    """The ranged splat (each range of vertex rows adds its entries, reading every point's row) against a
    float32 scatter into one copy in point order, written out in NumPy: the same bits for 1, 2, 3 and 7 ranges
    (so for any thread count), every row of the term written (cleared first), other rows untouched, and
    within float32 rounding of a float64 ``np.add.at``."""
    from crfrnn.lattice import _numba_kernels as nb

    rng = np.random.default_rng(3)
    n, d1, m, v0, cp = 400, 6, 90, 13, 8
    offsets = (rng.integers(0, m, n * d1) + v0).astype(np.int32)
    offsets[:d1] = v0 + m - 1  # the last row is hit
    bary = rng.random(n * d1, dtype=np.float32)
    pre = rng.random(n, dtype=np.float32) + 0.5
    rows = rng.standard_normal((n, cp), dtype=np.float32)
    want = np.zeros((m, cp), np.float32)
    for i in range(n):
        for r in range(d1):
            k = i * d1 + r
            w = np.float32(bary[k] * pre[i])
            want[offsets[k] - v0] = (w * rows[i].astype(np.float64) + want[offsets[k] - v0]).astype(np.float32)
    exact = np.zeros((m, cp))
    np.add.at(exact, offsets - v0, (bary * np.repeat(pre, d1)).astype(np.float32)[:, None] * np.repeat(rows, d1, 0))
    for ranges in (1, 2, 3, 7):
        dst = np.full((v0 + m + 5, cp), 7.0, np.float32)
        nb._splat_by_ranges(dst, rows, offsets, bary, pre, 0, d1, n, v0, m, ranges)
        np.testing.assert_array_equal(dst[v0:v0 + m], want)
        assert np.all(dst[:v0] == 7.0) and np.all(dst[v0 + m:] == 7.0)
    np.testing.assert_allclose(want, exact, rtol=0, atol=1e-5)


def _private_rows_by_definition(offsets: np.ndarray, parts: int, block: int) -> int:
    """The rows of private copies 1 ... parts-1 for one term's ``offsets (N, D+1)``, in NumPy: part ``p`` is
    ``parts``' share of the blocks of ``block`` points; its copy holds the rows from the lowest it touches up to
    (not including) the highest that earlier parts touch, the rest going straight to the shared lattice."""
    n = offsets.shape[0]
    nblk = -(-n // block)
    total, seen = 0, None
    for p in range(parts):
        touched = offsets[nblk * p // parts * block:min(n, nblk * (p + 1) // parts * block)]
        lo, hi = int(touched.min()), int(touched.max()) + 1
        if p > 0:
            total += max(0, min(hi, seen) - lo)
        seen = hi if seen is None else max(seen, hi)
    return total


@pytest.mark.parametrize("kernels", ["voc", "readme"])
def test_terms_whose_private_copies_would_hold_many_rows_are_splatted_by_ranges(kernels):
    """The fused pass's choice of splat (:func:`crfrnn.lattice.fused.splat_by_ranges`) counts the rows the
    scatter's private copies would hold (:func:`private_rows`) as the definition in NumPy does, and takes the
    vertex ranges from 0.1 rows per point: on a VOC image at 500x375, CRF-RNN's bilateral term (θα = 160,
    θβ = 3, its vertices spanning the image) is ranged, every spatial term (θγ = 3: vertices of a few pixels,
    shared by neighbouring parts only at their borders) and pydensecrf's README bilateral term (a few vertices
    per hundred pixels) scattered."""
    from crfrnn import bench
    from crfrnn.lattice import _numba_kernels as nb
    from crfrnn.lattice import fused

    paths = bench.voc_images(1)
    if not paths:
        pytest.skip("no VOC images in ../shared/data")
    rgb, unary = bench._case(paths[0], (375, 500), 21)
    d = bench._densecrf_setup(cd, rgb, unary, bench.kernel_sets()[kernels])
    stacked, n = d._fused_terms(), 375 * 500
    offsets, tstart, td1, vstart, vcount = stacked[1], stacked[2], stacked[3], stacked[6], stacked[7]
    parts = fused._splat_parts(n)
    assert parts > 1
    rows = nb.private_rows(offsets, tstart, td1, vstart, vcount, n, parts)
    want = [_private_rows_by_definition(offsets[tstart[t]:tstart[t] + n * td1[t]].reshape(n, td1[t]), parts,
                                        nb._BLOCK) for t in range(2)]
    assert rows.tolist() == want
    chosen = fused.splat_by_ranges(stacked, n)
    assert chosen.tolist() == [bool(r >= 0.1 * n) for r in want]
    assert chosen.tolist() == [False, kernels == "voc"], (kernels, rows / n)


# ------------------------------------------------------------------------------------------- lattice cache
def test_lattice_cache_keeps_the_most_recent_builds():
    from crfrnn.lattice import LatticeCache

    cache, built = LatticeCache(2), []

    def build(k):
        return lambda: built.append(k) or f"lattice {k}"

    assert cache.get("a", build("a")) == "lattice a" and cache.get("a", build("a")) == "lattice a"
    cache.get("b", build("b"))
    cache.get("a", build("a"))  # a is now the most recent: c drops b
    cache.get("c", build("c"))
    assert built == ["a", "b", "c"] and "a" in cache and "b" not in cache and len(cache) == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="size"):
            LatticeCache(bad)


def test_gaussian_term_from_a_lattice_cache_gives_the_same_result():
    """CRFs of same-size images sharing a cache share the Gaussian term's lattice (built once) and infer exactly
    as CRFs that build their own; another size or sxy is another entry; refine() takes the cache too."""
    from crfrnn.lattice import LatticeCache

    cache = LatticeCache(2)
    for start in (3, 4):
        _, img, mask, probs = _problem((60, 80), start=start)
        h, w = mask.shape
        crfs = []
        for c in (None, cache):
            d = cd.DenseCRF2D(w, h, 21, lattice_cache=c)
            d.setUnaryEnergy(cu.unary_from_softmax(probs))
            d.addPairwiseGaussian(sxy=3, compat=3)
            d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
            crfs.append(d)
        np.testing.assert_array_equal(np.array(crfs[0].inference(5)), np.array(crfs[1].inference(5)))
        np.testing.assert_array_equal(cd.refine(img, probs), cd.refine(img, probs, lattice_cache=cache))
    assert len(cache) == 1  # two images, two CRFs and two refines each: one lattice
    d = cd.DenseCRF2D(40, 30, 21, lattice_cache=cache)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseGaussian(sxy=5, compat=3)
    assert len(cache) == 2 and d._pairwise[0].lattice is not d._pairwise[1].lattice
    with pytest.raises(TypeError, match="lattice_cache"):
        cd.DenseCRF2D(40, 30, 21, lattice_cache={})
