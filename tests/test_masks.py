"""Block masks against their own mask_mod: full blocks are all kept, listed partial blocks hold a kept entry
(and a dropped one), unlisted blocks hold none; and their size does not depend on N."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from flexdilated import DilatedSpec
from flexdilated.layout import units
from flexdilated.masks import _block_tables, branch_mask_mod
from flexdilated.spec import branches


@st.composite
def branch_cases(draw):
    n = draw(st.integers(1, 4))
    segments = draw(st.lists(st.sampled_from([8, 16, 24, 32, 48, 64]), min_size=n, max_size=n))
    rates = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    spec = DilatedSpec(segments, rates, causal=draw(st.booleans()), overlap=draw(st.sampled_from(["multiset", "set"])))
    all_branches = branches(spec, draw(st.integers(1, 5)))
    branch = draw(st.sampled_from(all_branches))
    seglen = draw(st.integers(1, branch.segment))
    rows = -(-(branch.segment if draw(st.booleans()) else seglen) // branch.rate)
    return branch, seglen, rows, spec.causal, draw(st.sampled_from([2, 4, 8]))


@given(branch_cases())
def test_block_tables_agree_with_mask_mod(case):
    branch, seglen, rows, causal, block = case
    kv_num, kv_idx, full_num, full_idx = (t[0] for t in _block_tables(branch, seglen, rows, causal, torch.device("cpu"), block))
    mask_mod = branch_mask_mod(branch, seglen, causal, torch.device("cpu"))
    H, nb = len(branch.heads), -(-rows // block)
    i = torch.arange(rows)
    dense = mask_mod(torch.tensor(0), torch.arange(H)[:, None, None], i[None, :, None], i[None, None, :])
    for h in range(H):
        for qb in range(nb):
            partial = set(kv_idx[h, qb, : kv_num[h, qb]].tolist())
            full = set(full_idx[h, qb, : full_num[h, qb]].tolist())
            assert not partial & full
            for kb in range(nb):
                tile = dense[h, qb * block : (qb + 1) * block, kb * block : (kb + 1) * block]
                if kb in full:
                    assert tile.all()
                elif kb in partial and branch.nested:
                    assert tile.any() and not tile.all()
                elif kb in partial:  # exclusions that vary by segment are left to the mask_mod: a superset
                    pass
                else:
                    assert not tile.any()


def test_block_mask_size_is_independent_of_n():
    spec = DilatedSpec((64, 128, 256), (1, 2, 4), causal=True)
    for branch in branches(spec, 4):
        shapes = set()
        for N in (256, 512, 4096, 1000, 70000):
            for unit in units(branch, N, pad_tail=True):
                tables = _block_tables(branch, unit.seglen, unit.rows, True, torch.device("cpu"), 16)
                shapes.add(tuple(tuple(t.shape) for t in tables))
        assert len(shapes) == 1, shapes


def test_dilated_branches_are_made_of_full_blocks():
    """With w / r a multiple of the block, a dilated pattern costs no partial block off the diagonal (SPEC §3)."""
    spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
    for branch in branches(spec, 8):
        kv_num, _, full_num, _ = _block_tables(branch, branch.segment, branch.segment // branch.rate, False, torch.device("cpu"), 128)
        assert kv_num.sum() == 0 and (full_num == 16).all()
