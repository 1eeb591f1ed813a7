"""SAS (sasgate.sas) and its SAE-space interventions, on a real sae-lens SAE with hand-set weights,
so every latent value, mean and decoded vector can be checked by hand."""

from __future__ import annotations

import pytest
import torch

from sasgate import sas
from sasgate.errors import ArtifactError
from sasgate.interventions import decoded_vector, sae_latent_ablation
from sasgate.params import TupleParams


@pytest.fixture
def sae():
    """A sae-lens StandardSAE (ReLU) whose latents 0..2 read the input's coordinates 0..2 and latent 3
    reads minus coordinate 0; the decoder is a fixed random matrix with a non-zero bias."""
    from sae_lens import StandardSAE, StandardSAEConfig

    s = StandardSAE(StandardSAEConfig(d_in=3, d_sae=4, apply_b_dec_to_input=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        s.W_enc.copy_(torch.tensor([[1.0, 0, 0, -1], [0, 1, 0, 0], [0, 0, 1, 0]]))
        s.b_enc.zero_()
        s.W_dec.copy_(torch.randn(4, 3, generator=g))
        s.b_dec.copy_(torch.tensor([0.5, -0.25, 1.0]))
    return s


ACTS = torch.tensor([[2.0, 0, 0], [4.0, 1, 0], [0, 0, 1.0], [0, 1.0, 3.0]])
HARMFUL = torch.tensor([True, True, False, False])


def test_latent_means_are_per_class_means_of_the_sae_encoding(sae):
    mean_h, mean_l = sas.latent_means(sae, ACTS, HARMFUL)
    assert torch.allclose(mean_h, torch.tensor([3.0, 0.5, 0, 0], dtype=torch.float64))
    assert torch.allclose(mean_l, torch.tensor([0, 0.5, 2.0, 0], dtype=torch.float64))
    small_batches = sas.latent_means(sae, ACTS, HARMFUL, batch_size=1)
    assert torch.equal(small_batches[0], mean_h) and torch.equal(small_batches[1], mean_l)


def test_latent_means_need_both_classes(sae):
    with pytest.raises(ValueError, match="both classes"):
        sas.latent_means(sae, ACTS, torch.ones(4, dtype=torch.bool))


def test_top_latents_keep_only_positive_differences_largest_first_ties_by_id():
    diff = torch.tensor([0.5, 2.0, -1.0, 2.0, 0.0, 0.1])
    assert sas.top_latents(diff, 3) == [1, 3, 0]
    assert sas.top_latents(diff, 10) == [1, 3, 0, 5]  # never the zero or negative ones
    assert sas.top_latents(-diff.abs(), 3) == []


def test_decoded_vector_is_the_weighted_decoder_rows_without_the_bias(sae):
    got = decoded_vector(sae, [0, 2], [1.5, -1.0])
    assert torch.allclose(got, 1.5 * sae.W_dec[0] - sae.W_dec[2], atol=1e-6)
    assert torch.equal(decoded_vector(sae, [], []), torch.zeros(3))


def test_latent_ablation_keeps_the_error_term(sae):
    x = torch.tensor([[[2.0, -1.0, 3.0], [0.5, 0.5, -0.5]]])  # [batch, pos, d_model]
    (_, off), = sae_latent_ablation("h", sae, [0, 2], coefficient=0.0)
    assert torch.allclose(off(x, None), x, atol=1e-6)  # removing nothing changes nothing, bad SAE or not
    (_, full), = sae_latent_ablation("h", sae, [0, 2], coefficient=1.0)
    f = torch.relu(x @ sae.W_enc)
    expected = x - f[..., 0:1] * sae.W_dec[0] - f[..., 2:3] * sae.W_dec[2]
    assert torch.allclose(full(x, None), expected, atol=1e-5)
    (_, half), = sae_latent_ablation("h", sae, [0, 2], coefficient=0.5)
    assert torch.allclose(half(x, None), (x + expected) / 2, atol=1e-5)


def test_nearest_tuple_measures_residual_position_in_blocks_ties_to_the_first_listed():
    tuples = [TupleParams(layer=1, site="resid_pre", sae="train"), TupleParams(layer=1, site="resid_post", sae="train"),
              TupleParams(layer=3, site="resid_pre", sae="train")]
    assert sas.nearest_tuple(tuples, 1)[0].key == "L1.resid_pre"
    assert sas.nearest_tuple(tuples, 2) == (tuples[1], 0.0)  # resid_post of 1 is resid_pre of 2
    t, dist = sas.nearest_tuple(tuples[1:], 0)
    assert (t.key, dist) == ("L1.resid_post", 2.0)
    assert sas.nearest_tuple([tuples[0], tuples[2]], 2)[0] is tuples[0]  # both 1 block away
    assert sas.nearest_tuple([tuples[2], tuples[0]], 2)[0] is tuples[2]
    assert sas.residual_index("attn_out", 2) == 2.5


def test_load_steering_names_the_missing_artifact(tmp_path):
    (tmp_path / sas.RECORD_FILE).write_text('{"steer_tuple": {"key": "L1.resid_post"}}')
    with pytest.raises(ArtifactError, match="dvc repro features"):
        sas.load_steering(tmp_path)
