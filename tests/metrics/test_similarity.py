"""Linear CKA / SVCCA against independent reference formulas, and the stage-similarity pipeline on real backbones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medssl_monai.networks.cbr  # noqa: F401  (registers the CBR backbones)
from medssl_monai.metrics.similarity import (
    collect_activations,
    conv_to_matrix,
    linear_cka,
    stage_similarity,
    svcca,
    svd_reduce,
)
from medssl_monai.networks.backbones import get_backbone
from medssl_monai.reporting.similarity import save_similarity


def _orthogonal(p: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((p, p)))
    return q * np.sign(np.diag(r))


def _naive_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kernel-space CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with an explicit centring matrix H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def _naive_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations as sqrt of the eigenvalues of Sxx^-1 Sxy Syy^-1 Syx (textbook CCA)."""
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    ev = np.sort(np.linalg.eigvals(m).real)[::-1][: min(x.shape[1], y.shape[1])]
    return np.sqrt(np.clip(ev, 0, 1))


# ----------------------------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("n,p,q", [(300, 10, 7), (40, 60, 90)])  # feature form and Gram form
def test_cka_matches_naive_kernel_formula(n, p, q):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, p))
    y = x[:, :1] * 2 + rng.standard_normal((n, q)) + 3.0  # related, with an offset that centring removes
    assert linear_cka(x, y) == pytest.approx(_naive_cka(x, y), rel=1e-10, abs=1e-12)
    assert 0.05 < linear_cka(x, y) < 0.95


def test_cka_invariances_and_non_invariance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    y = np.tanh(x @ rng.standard_normal((12, 8))) + 0.3 * rng.standard_normal((500, 8))
    base = linear_cka(x, y)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x @ _orthogonal(12, rng), y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 7.5 * y @ _orthogonal(8, rng)) == pytest.approx(base, abs=1e-10)
    scale = np.ones(12)
    scale[0] = 20.0  # non-isotropic scaling changes CKA (it is not invariant to invertible linear maps)
    assert abs(linear_cka(x * scale, y) - base) > 0.02
    assert linear_cka(x * scale, x) < 0.9


def test_cka_edge_cases():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 3))
    assert np.isnan(linear_cka(x, np.ones((20, 4))))
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, x[:10])
    with pytest.raises(ValueError, match="2D"):
        linear_cka(rng.standard_normal((20, 3, 2)), x)


# ----------------------------------------------------------------------------------------------- SVCCA


def test_svcca_planted_canonical_correlations():
    rng = np.random.default_rng(3)
    n, rho = 20000, np.array([0.95, 0.8, 0.6, 0.4, 0.1])
    z, e = rng.standard_normal((n, 5)), rng.standard_normal((n, 5))
    x = z @ _orthogonal(5, rng)  # orthogonal mixing keeps the variance spread evenly (no SVD truncation)
    y = (rho * z + np.sqrt(1 - rho**2) * e) @ _orthogonal(5, rng) + 4.0
    mean, corr = svcca(x, y, return_correlations=True)
    assert corr.shape == (5,)
    np.testing.assert_allclose(corr, np.sort(rho)[::-1], atol=0.02)
    assert mean == pytest.approx(rho.mean(), abs=0.01)


def test_svcca_matches_textbook_cca_and_pearson():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 4)) @ rng.standard_normal((4, 4))
    y = x[:, :2] @ rng.standard_normal((2, 3)) + rng.standard_normal((400, 3))
    _, corr = svcca(x, y, keep_variance=1.0, return_correlations=True)
    np.testing.assert_allclose(corr, _naive_cca(x, y), atol=1e-8)
    a = rng.standard_normal((300, 1))
    b = 0.5 * a + rng.standard_normal((300, 1))
    assert svcca(a, b) == pytest.approx(abs(np.corrcoef(a[:, 0], b[:, 0])[0, 1]), abs=1e-10)
    assert svcca(a, -b) == pytest.approx(svcca(a, b), abs=1e-12)


def test_svcca_self_independent_and_reduction():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 10))
    assert svcca(x, x) == pytest.approx(1.0, abs=1e-10)
    assert svcca(x, 3 * x @ rng.standard_normal((10, 10))) == pytest.approx(1.0, abs=1e-8)
    assert svcca(x, rng.standard_normal((3000, 10))) < 0.1
    # 3 strong directions + 1 with 0.01% of the variance: keep_variance=0.99 drops the weak one
    w = rng.standard_normal((2000, 4)) * np.array([3.0, 2.0, 2.5, 0.03])
    assert svd_reduce(w, 0.99).shape == (2000, 3)
    assert svd_reduce(w, 1.0).shape == (2000, 4)
    basis = svd_reduce(w, 0.99)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-10)
    with pytest.warns(UserWarning, match="trivially"):
        assert svcca(rng.standard_normal((20, 15)), rng.standard_normal((20, 15)), keep_variance=1.0) > 0.5


# ----------------------------------------------------------------------------------------- activations


def test_conv_to_matrix_modes():
    act = torch.randn(4, 6, 5, 3)
    pooled = conv_to_matrix(act)
    assert pooled.shape == (4, 6)
    torch.testing.assert_close(pooled[1], act[1].mean(dim=(1, 2)))
    pos = conv_to_matrix(act, "positions")
    assert pos.shape == (4 * 5 * 3, 6)
    torch.testing.assert_close(pos[5 * 3 + 2 * 3 + 1], act[1, :, 2, 1])  # example-major, then row, column
    sub = conv_to_matrix(act, "positions", max_points=17, seed=3)
    assert sub.shape == (17, 6)
    torch.testing.assert_close(sub, conv_to_matrix(act, "positions", max_points=17, seed=3))
    rows = {tuple(r.tolist()) for r in pos}
    assert all(tuple(r.tolist()) in rows for r in sub)
    assert conv_to_matrix(torch.randn(4, 6, 2, 2, 2)).shape == (4, 6)  # 3D volumes
    assert conv_to_matrix(torch.randn(4, 6)).shape == (4, 6)
    with pytest.raises(ValueError, match="mode"):
        conv_to_matrix(act, "bogus")


def _tiny(seed: int):
    torch.manual_seed(seed)
    return get_backbone("cbr_tiny", channels=(16, 32, 64, 64))


def _images(n: int = 160, batch: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.randn(n, 3, 32, 32, generator=gen), 3, 1, 1)
    return [x[i : i + batch] for i in range(0, n, batch)]


def test_collect_activations_bounded():
    model = _tiny(0).train()
    seen = []

    def loader():
        for i, x in enumerate(_images()):
            seen.append(i)
            yield {"image": x, "label": torch.zeros(len(x))}

    acts = collect_activations(model, loader(), stages=["block1", "block3"], max_examples=50)
    assert set(acts) == {"block1", "block3"}
    assert acts["block1"].shape == (50, 16) and acts["block3"].shape == (50, 64)
    assert acts["block1"].dtype == torch.float32
    assert seen == [0, 1]  # stopped reading once every stage held max_examples rows
    assert model.training  # training flag restored
    pos = collect_activations(model, _images(), "block4", max_examples=100, mode="positions", max_points=30)
    assert pos["block4"].shape == (100, 64)


def test_stage_similarity_and_save(tmp_path):
    a, b = _tiny(0), _tiny(1)
    loader = _images()
    same = stage_similarity(a, a, loader)
    assert list(same.index) == list(same.columns) == a.stage_names
    np.testing.assert_allclose(np.diag(same.to_numpy()), 1.0, atol=1e-6)
    assert same.attrs["n_rows"] == 160
    # a separately built copy loading a's weights is identical; a differently initialised one is not
    twin = _tiny(7)
    twin.load_state_dict(a.state_dict())
    np.testing.assert_allclose(np.diag(stage_similarity(a, twin, loader).to_numpy()), 1.0, atol=1e-6)
    other = stage_similarity(a, b, loader, name_a="seed0", name_b="seed1")
    assert (np.diag(other.to_numpy()) < 0.95).all()
    assert other.to_numpy().max() <= 1.0 and other.to_numpy().min() >= 0.0

    pos = stage_similarity(a, b, loader, mode="positions", max_points=64)
    assert np.isfinite(np.diag(pos.to_numpy())).all()
    assert np.isnan(pos.loc["block1", "block2"])  # different spatial sizes: no corresponding rows
    # separate models with equal shapes get the same position subsample, so their rows correspond
    twin_pos = stage_similarity(a, twin, loader, mode="positions", max_points=64)
    np.testing.assert_allclose(np.diag(twin_pos.to_numpy()), 1.0, atol=1e-6)

    sv = stage_similarity(a, a, loader, method="svcca", stages_a=["block1"], stages_b=["block1", "block4"])
    assert sv.shape == (1, 2) and sv.loc["block1", "block1"] == pytest.approx(1.0, abs=1e-8)

    csv, png = tmp_path / "out" / "sim.csv", tmp_path / "out" / "sim.png"
    save_similarity(other, csv, png)
    back = pd.read_csv(csv, index_col=0)
    assert back.index.name == "seed0"
    np.testing.assert_allclose(back.to_numpy(), other.to_numpy(), rtol=1e-5)
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    save_similarity(pos, png_path=png)  # NaN cells are drawn too; the file is replaced in place
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError, match="method"):
        stage_similarity(a, b, loader, method="rsa")


def test_similarity_cli_on_real_images(tmp_path) -> None:
    """`medssl similarity` on HAM10000 `mini` images: a model against itself gives 1 on the diagonal."""
    import pandas as pd
    import torch
    from conftest import require_data

    from medssl_monai.cli import main
    from medssl_monai.data import table_to_manifest, write_manifest
    from medssl_monai.networks import get_backbone

    ham = require_data("ham10000")
    m = table_to_manifest(ham / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    write_manifest(m[m["mini"]], tmp_path / "mini.csv")
    torch.manual_seed(0)
    torch.save(get_backbone("cbr_tiny").state_dict(), tmp_path / "a.pt")
    torch.manual_seed(1)
    torch.save(get_backbone("cbr_tiny").state_dict(), tmp_path / "b.pt")
    for other, name in (("a.pt", "self"), ("b.pt", "other")):
        assert main(["similarity", str(tmp_path / "a.pt"), str(tmp_path / other), "--manifest",
                     str(tmp_path / "mini.csv"), "--backbone-a", "cbr_tiny", "--image-size", "32",
                     "--limit", "96", "--out", str(tmp_path / name)]) == 0
    same = pd.read_csv(tmp_path / "self.csv", index_col=0)
    diff = pd.read_csv(tmp_path / "other.csv", index_col=0)
    assert same.shape == (4, 4) and list(same.index) == ["block1", "block2", "block3", "block4"]
    assert all(abs(same.iloc[i, i] - 1) < 1e-6 for i in range(4))
    assert all(diff.iloc[i, i] < 0.999 for i in range(4))
    assert (tmp_path / "self.png").stat().st_size > 5000


def test_similarity_cli_slimmed_net(tmp_path, capsys) -> None:
    """A slimmed hybrid (narrower upper stages) is compared with its full-width parent when the factory
    arguments are given; without them its checkpoint does not fit the default net and the CLI says so."""
    import pandas as pd
    import torch
    from conftest import require_data

    from medssl_monai.cli import main
    from medssl_monai.data import table_to_manifest, write_manifest
    from medssl_monai.networks import get_backbone

    ham = require_data("ham10000")
    m = table_to_manifest(ham / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    write_manifest(m[m["mini"]], tmp_path / "mini.csv")
    slim = '{"block_inplanes": [64, 64, 128, 256]}'
    torch.manual_seed(0)
    torch.save(get_backbone("resnet18", block_inplanes=[64, 64, 128, 256]).state_dict(), tmp_path / "slim.pt")
    torch.save(get_backbone("resnet18").state_dict(), tmp_path / "full.pt")
    common = ["--manifest", str(tmp_path / "mini.csv"), "--image-size", "32", "--limit", "64"]
    # a slimmed net read as a full one: one clear line naming the shape mismatch, non-zero exit
    assert main(["similarity", str(tmp_path / "slim.pt"), str(tmp_path / "full.pt"), *common,
                 "--out", str(tmp_path / "x")]) != 0
    assert "shape mismatch" in capsys.readouterr().err
    assert main(["similarity", str(tmp_path / "slim.pt"), str(tmp_path / "slim.pt"), *common,
                 "--backbone-kwargs-a", slim, "--out", str(tmp_path / "self")]) == 0
    assert main(["similarity", str(tmp_path / "slim.pt"), str(tmp_path / "full.pt"), *common,
                 "--backbone-kwargs-a", slim, "--backbone-kwargs-b", "{}", "--out", str(tmp_path / "vs")]) == 0
    same = pd.read_csv(tmp_path / "self.csv", index_col=0)
    vs = pd.read_csv(tmp_path / "vs.csv", index_col=0)
    assert all(abs(same.iloc[i, i] - 1) < 1e-6 for i in range(len(same)))
    assert vs.shape == same.shape == (5, 5) and vs.iloc[-1, -1] < 0.999  # different nets, different top stage
    assert main(["similarity", str(tmp_path / "slim.pt"), str(tmp_path / "slim.pt"), *common,
                 "--backbone-kwargs-a", "{block_inplanes: 1}"]) != 0
    assert "not valid JSON" in capsys.readouterr().err
