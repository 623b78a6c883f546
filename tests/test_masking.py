import pytest
import torch

from openmae.masking import block_mask, grid_mask, masking_from_mask, masking_from_noise, num_kept, sample_mask


def test_kept_count_and_restore():
    n, length, ratio = 4, 49, 0.75
    noise = torch.rand(n, length)
    m = masking_from_noise(noise, num_kept(length, ratio))
    assert m.len_keep == int(length * (1 - ratio)) == 12
    assert torch.all(m.mask.sum(1) == length - 12)
    ar = torch.arange(length).expand(n, -1)
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), ar)
    # the kept ones are the smallest noise values
    kept = torch.gather(noise, 1, m.ids_shuffle[:, :12])
    removed = torch.gather(noise, 1, m.ids_shuffle[:, 12:])
    assert torch.all(kept.max(1).values < removed.min(1).values)
    assert torch.equal(m.mask.bool(), torch.gather(torch.arange(length).expand(n, -1) >= 12, 1, m.ids_restore))


def test_random_mask_uniform_coverage():
    g = torch.Generator().manual_seed(0)
    masks = sample_mask("random", 4000, (7, 7), 0.75, g).float()
    freq = masks.mean(0)
    expected = (49 - 12) / 49
    assert torch.all((freq - expected).abs() < 0.03)  # no centre bias
    centre, corner = freq[24], freq[0]
    assert abs(centre - corner) < 0.05


@pytest.mark.parametrize("ratio", [0.4, 0.5, 0.75])
def test_block_mask_counts_and_blocks(ratio):
    g = torch.Generator().manual_seed(1)
    m = block_mask(16, (14, 14), ratio, g)
    target = 196 - num_kept(196, ratio)
    assert torch.all(m.sum(1) == target)
    # block-wise masks are spatially clustered: far more masked neighbours than random masks
    def neighbour_agreement(mm):
        grid = mm.reshape(-1, 14, 14).float()
        return (grid[:, :, 1:] == grid[:, :, :-1]).float().mean()

    rnd = sample_mask("random", 16, (14, 14), ratio, g)
    assert neighbour_agreement(m) > neighbour_agreement(rnd) + 0.1


def test_grid_mask_keeps_one_of_four():
    g = torch.Generator().manual_seed(0)
    m = grid_mask(3, (6, 8), g)
    assert torch.all(m.sum(1) == 48 - 12)
    kept = (~m[0]).reshape(6, 8).nonzero()
    assert len({(int(r) % 2, int(c) % 2) for r, c in kept}) == 1  # one corner of each 2x2 cell
    m_odd = grid_mask(2, (7, 7), g)
    assert m_odd.sum(1)[0] == m_odd.sum(1)[1]


def test_explicit_mask_order_and_errors():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    m = masking_from_mask(mask)
    assert m.len_keep == 2
    assert m.ids_shuffle[0, :2].tolist() == [1, 3]
    assert m.ids_shuffle[1, :2].tolist() == [0, 1]
    with pytest.raises(ValueError, match="same number"):
        masking_from_mask(torch.tensor([[1, 0, 0], [1, 1, 0]]))
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept(10, 1.0)
    with pytest.raises(ValueError, match="unknown mask type"):
        sample_mask("checker", 1, (2, 2), 0.5)
