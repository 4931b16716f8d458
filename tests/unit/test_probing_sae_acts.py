"""SAE latents of probing activations, stored sparse: the CSR file equals the dense encoding."""

import numpy as np
import torch
from sae_lens import SAE, StandardSAEConfig

from saeflow.probing import sae_acts


def test_sparse_roundtrip_equals_dense_encode(tmp_path):
    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=16, d_sae=64).to_dict())
    with torch.no_grad():
        sae.W_enc.data = torch.randn(16, 64)
        sae.b_enc.data = torch.full((64,), -1.0)  # most latents off: a sparse code
    x = np.random.RandomState(0).randn(37, 16).astype(np.float32)
    z = sae_acts.encode_sparse(sae, x, batch_size=10)
    dense = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert 0 < z.nnz < dense.size / 2
    y = np.arange(37) % 2
    sae_acts.write(str(tmp_path / "z.h5"), z, y, {"sae_id": "s"})
    back, y_back = sae_acts.read_sparse(str(tmp_path / "z.h5"))
    np.testing.assert_allclose(back.toarray(), dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y_back, y)
