"""The import paths the README and docs promise keep working after the move into packages."""
import importlib

import pytest


@pytest.mark.parametrize(
    "module, names",
    [
        ("crfrnn", ["refine", "CrfRnn", "mean_field", "PermutohedralLattice", "permutohedral_filter",
                    "dense_gaussian_filter", "CrfRnnHead", "CrfRnnNet", "FCN8s", "load_crfasrnn_weights"]),
        ("crfrnn.densecrf", ["DenseCRF2D", "DenseCRF", "NORMALIZE_SYMMETRIC", "DIAG_KERNEL", "refine"]),
        ("crfrnn.utils", ["unary_from_softmax", "unary_from_labels", "create_pairwise_bilateral"]),
        ("crfrnn.weights", ["load_crfasrnn_weights", "load_crfasrnn_keras_weights", "fcn8s_from_vgg16"]),
        ("crfrnn.train", ["TrainConfig", "train", "evaluate", "load_checkpoint", "save_checkpoint"]),
        ("crfrnn.metrics", ["confusion_matrix", "mean_iou", "format_iou_table"]),
        ("crfrnn.data", ["VOCSegmentation", "CamVid", "SegmentationFolder", "read_image", "pad_collate"]),
        ("crfrnn.models", ["FCN8s", "CrfRnnNet", "CrfRnnHead", "TinyCrfRnnNet"]),
        ("crfrnn.lattice", ["PermutohedralLattice", "dense_gaussian_filter"]),
        ("crfrnn.meanfield", ["CrfRnn", "mean_field", "crf_features"]),
    ],
)
def test_public_paths(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_aliases_are_the_same_objects():
    import crfrnn.densecrf.utils as du
    import crfrnn.engine as engine
    import crfrnn.models.weights as mw
    import crfrnn.train as tr
    import crfrnn.utils as u
    import crfrnn.weights as w

    assert u.unary_from_softmax is du.unary_from_softmax
    assert w.load_crfasrnn_weights is mw.load_crfasrnn_weights
    assert tr.TrainConfig is engine.TrainConfig
