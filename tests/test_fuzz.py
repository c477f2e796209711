"""Property-based fuzzing (hypothesis; derandomized, a fixed example budget): fused_code_ce, code_beam_search,
CodeTrie and CodeBook files on random and crafted inputs. Every case either matches reference.py in float64
(or an exhaustive search) or raises a named ValueError / TypeError; none crashes, hangs or answers wrongly.
The number of cases each test tried is printed in pytest's summary (tests/conftest.py)."""
import collections
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gif_kernels
from gif_kernels import CodeBook, code_beam_search, exhaustive_code_topk, reference
from gif_kernels.codebook import CodeTrie
from tests.helpers import emulated_cuda
from tests.helpers.code_ce_cases import check_against_reference
from tests.test_beam_search import check_search, peaked_scores, random_codes
from tests.test_emulated_cuda import emulated_code_ce

CASES = collections.Counter()  # cases tried per test and outcome, for the summary


def budget(examples):
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@st.composite
def code_ce_cases(draw, max_batch=6):
    # Each size is 0 in one case of eight (an empty batch, or shapes the op refuses), else 1 up.
    B, L, V, D = (draw(st.integers(1, hi)) if draw(st.integers(0, 7)) else 0 for hi in (max_batch, 4, 40, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    shared = draw(st.booleans())
    x = torch.randn((B, D) if shared else (B, L, D), generator=gen, dtype=torch.float64)
    if draw(st.booleans()) and B and D:  # a zero row and a row below the norm eps
        x[0] = 0
        x[-1] *= 1e-13
    weight = torch.randn(L, V, D, generator=gen, dtype=torch.float64)
    layout = draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    if layout == "strided":  # every other feature of twice as many
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
        weight = torch.repeat_interleave(weight, 2, dim=-1)[..., ::2]
    elif layout == "expanded" and not shared and B:  # one feature row seen by every position
        x = x[:, :1].expand(-1, L, -1)
    ignore_index = draw(st.sampled_from([-100, 0]))
    codes = torch.randint(0, max(V, 1), (B, L), generator=gen)
    if B * L:
        codes.view(-1)[torch.randint(0, B * L, (max(1, B * L // 5),), generator=gen)] = ignore_index
    bad_code = draw(st.integers(0, 7)) == 0 and B * L > 0
    if bad_code:
        codes.view(-1)[0] = draw(st.sampled_from([-1, V, V + 7]))
    codes = codes.to(draw(st.sampled_from([torch.int64, torch.int32])))
    normalize = draw(st.booleans())
    m2 = draw(st.sampled_from([0.0, 0.3])) if normalize or draw(st.integers(0, 7)) == 0 else 0.0
    kwargs = dict(scale=draw(st.sampled_from([1.0, 16.0, 64.0])), m2=m2,
                  m3=draw(st.sampled_from([0.0, 0.2])), normalize=normalize, ignore_index=ignore_index,
                  reduction=draw(st.sampled_from(["none", "sum", "mean"])))
    if not normalize:  # raw dot products: keep the logits of a size that float32 resolves
        x, weight = x * 0.3, weight * 0.3
    position_weight = 0.5 + torch.rand(L, generator=gen, dtype=torch.float64)
    inputs = dict(x=x.to(dtype), weight=weight.to(dtype), codes=codes, position_weight=position_weight,
                  grad_rows=torch.randn(B, L, generator=gen, dtype=torch.float64))
    bad = ["weight"] if min(L, V, D) < 1 else []
    if not normalize and kwargs["m2"] != 0:
        bad.append("m2")
    if bad_code and not (codes.view(-1)[0] == ignore_index):
        bad.append("codes")
    return inputs, kwargs, bad


def check_code_ce_case(backend, case, deterministic=None):
    """Counts the case under its outcome: rejected (a named error), empty batch, or matched."""
    inputs, kwargs, bad = case
    kwargs = dict(kwargs)
    reduction = kwargs.pop("reduction")
    name = f"fused_code_ce {'CUDA emulation' if callable(backend) else backend}"
    CASES[f"{name}: {'rejected' if bad else 'empty batch' if inputs['x'].shape[0] == 0 else 'matched'}"] += 1
    loss_of = backend if callable(backend) else functools.partial(
        gif_kernels.fused_code_ce, backend=backend, deterministic=deterministic)
    if bad:
        with pytest.raises((ValueError, TypeError), match="|".join(f"{name}:" for name in bad)):
            x, weight = inputs["x"].requires_grad_(), inputs["weight"].requires_grad_()
            loss_of(x, weight, inputs["codes"], inputs["position_weight"], reduction=reduction,
                    **kwargs).sum().backward()
    elif inputs["x"].shape[0] == 0:
        loss = loss_of(inputs["x"], inputs["weight"], inputs["codes"], inputs["position_weight"],
                       reduction=reduction, **kwargs)
        assert loss.numel() == 0 or (loss.item() == 0 if reduction == "sum" else math.isnan(loss.item()))
    else:
        check_against_reference(backend, inputs, reduction=reduction, deterministic=deterministic, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@budget(400)
@given(case=code_ce_cases())
def test_fused_code_ce(backend, case):
    assume(backend != "reference" or "codes" not in case[2])  # the ground truth does not check codes
    check_code_ce_case(backend, case)


@pytest.mark.triton
@budget(80)
@given(case=code_ce_cases(max_batch=3), deterministic=st.booleans())
def test_fused_code_ce_triton(case, deterministic):
    check_code_ce_case("triton", case, deterministic)


@pytest.fixture(scope="module")
def emulated_ops():
    return emulated_cuda.load()


@budget(60)
@given(case=code_ce_cases(max_batch=4))
def test_fused_code_ce_cuda_emulation(emulated_ops, case):
    # The CUDA kernels give rows with a code outside [0, V) a NaN loss (a check would be a host sync).
    assume("codes" not in case[2])
    check_code_ce_case(emulated_code_ce(emulated_ops), case)


@budget(60)
@given(seed=st.integers(0, 2**16), array=st.sampled_from(["child_offsets", "child_tokens", "leaf_ids"]),
       value=st.integers(-3, 70), beam=st.sampled_from([2, 4, 64]))
def test_beam_search_cuda_emulation_on_crafted_tries(emulated_ops, seed, array, value, beam):
    """Where the C++ CPU kernel accepts a crafted trie, the CUDA kernel gives its bits; where it refuses one,
    the CUDA kernel (which does not read the arrays' contents on the host) still runs with masked reads."""
    trie = CodeBook(random_codes(40, 3, 5, seed), 5).trie()
    arrays = [getattr(trie, name).clone() for name in ("child_offsets", "child_tokens", "leaf_ids")]
    target = arrays[["child_offsets", "child_tokens", "leaf_ids"].index(array)]
    target[seed % target.numel()] = value
    scores = peaked_scores(4, 3, 5, seed, torch.float32)
    try:
        expected = torch.ops.gif.code_beam_search(scores, *arrays, beam, 2)
    except ValueError:
        CASES["code_beam_search CUDA emulation crafted: refused by the CPU check, ran"] += 1
        ids, _, _ = emulated_ops.code_beam_search(scores, *arrays, beam, 2)
        assert ids.shape == (4, 2)
        return
    CASES["code_beam_search CUDA emulation crafted: matched"] += 1
    for want, got in zip(expected, emulated_ops.code_beam_search(scores, *arrays, beam, 2)):
        assert torch.equal(want, got)


@budget(150)
@given(num_ids=st.integers(1, 60), length=st.integers(1, 4), vocab=st.integers(2, 7), beam=st.integers(1, 70),
       topk=st.integers(1, 6), seed=st.integers(0, 2**16), clusters=st.integers(0, 3))
def test_beam_search_against_exhaustive_search(num_ids, length, vocab, beam, topk, seed, clusters):
    assume(vocab ** length >= 2 * num_ids)  # room for num_ids unique codes among random_codes' draws
    CASES["code_beam_search"] += 1
    codes = random_codes(num_ids, length, vocab, seed, clusters=min(clusters, num_ids))
    check_search(peaked_scores(5, length, vocab, seed), codes, vocab, max(beam, topk), topk)


def leaf_codes(offsets, tokens, leaves, length):
    """Identity id -> code (N, L) of arrays the op accepted, read from them alone."""
    parent = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    node = np.arange(offsets.size - 1 - leaves.size, offsets.size - 1)
    codes = np.empty((leaves.size, length), dtype=np.int64)
    for level in reversed(range(length)):
        codes[:, level] = tokens[node - 1]
        node = parent[node - 1]
    out = np.empty_like(codes)
    out[leaves] = codes
    return torch.from_numpy(out)


@budget(200)
@given(seed=st.integers(0, 2**16), array=st.sampled_from(["child_offsets", "child_tokens", "leaf_ids"]),
       value=st.integers(-3, 70), beam=st.sampled_from([2, 64]))
def test_beam_search_op_on_crafted_tries(seed, array, value, beam):
    """One entry of a valid trie's arrays set to another value: the op raises ValueError, or its answer is
    the search of the trie the arrays now describe."""
    trie = CodeBook(random_codes(40, 3, 5, seed), 5).trie()
    arrays = {name: getattr(trie, name).clone() for name in ("child_offsets", "child_tokens", "leaf_ids")}
    target = arrays[array]
    target[seed % target.numel()] = value
    scores = peaked_scores(4, 3, 5, seed, torch.float32)
    try:
        ids, total, _ = torch.ops.gif.code_beam_search(scores, *arrays.values(), beam, 3)
    except ValueError:
        CASES["code_beam_search crafted: rejected"] += 1
        return
    CASES["code_beam_search crafted: searched"] += 1
    codes = leaf_codes(*(a.numpy() for a in arrays.values()), 3)
    assert ((ids >= -1) & (ids < codes.shape[0])).all()
    picked = codes[ids.clamp(min=0)]
    sums = sum(scores[torch.arange(4)[:, None], j, picked[..., j]] for j in range(3))
    torch.testing.assert_close(total[ids >= 0], sums[ids >= 0])
    if beam >= codes.shape[0]:
        ref_ids, _ = exhaustive_code_topk(scores, codes, 3)
        assert torch.equal(ids, ref_ids)


@budget(200)
@given(seed=st.integers(0, 2**16), array=st.sampled_from(["child_offsets", "child_tokens", "level_starts",
                                                          "leaf_ids"]), value=st.integers(-3, 70))
def test_code_trie_on_crafted_arrays(seed, array, value):
    """CodeTrie raises ValueError, or the arrays are a trie of unique codes that lookup finds again."""
    trie = CodeBook(random_codes(40, 3, 5, seed), 5).trie()
    arrays = {name: getattr(trie, name).clone() for name in ("child_offsets", "child_tokens", "level_starts",
                                                             "leaf_ids")}
    arrays[array][seed % arrays[array].numel()] = value
    try:
        crafted = CodeTrie(**arrays, vocab=5)
    except ValueError:
        CASES["CodeTrie crafted: rejected"] += 1
        return
    CASES["CodeTrie crafted: accepted"] += 1
    codes = crafted.codes()
    assert codes.unique(dim=0).shape[0] == codes.shape[0]
    assert torch.equal(crafted.lookup(codes), torch.arange(codes.shape[0]))
    scores = peaked_scores(3, 3, 5, seed)
    ids, _, exact = code_beam_search(scores, crafted, beam=codes.shape[0], topk=2)
    assert exact.all() and torch.equal(ids, exhaustive_code_topk(scores, codes, 2)[0])


@pytest.fixture(scope="module")
def codebook_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "codes.safetensors"
    book = CodeBook(random_codes(50, 3, 6, seed=1), 6, names=[f"id{i}" for i in range(50)])
    book.save(path)
    return path.read_bytes(), book


@budget(150)
@given(data=st.data())
def test_codebook_load_of_damaged_files(codebook_file, tmp_path_factory, data):
    """Bytes changed or cut off: load raises ValueError, or gives back the same codes and names."""
    blob, book = codebook_file
    damaged = bytearray(blob)
    if data.draw(st.booleans()):
        damaged = damaged[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            damaged[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("damaged") / "codes.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        loaded = CodeBook.load(path)
    except ValueError:
        CASES["CodeBook.load damaged: rejected"] += 1
        return
    CASES["CodeBook.load damaged: loaded"] += 1
    assert torch.equal(loaded.codes, book.codes) and loaded.names == book.names and loaded.vocab == book.vocab


def test_reference_matches_itself_on_an_empty_batch():
    # The fuzzer's B = 0 branch relies on the reference's conventions: sum 0, mean NaN.
    x, weight, codes = torch.zeros(0, 4), torch.randn(2, 3, 4), torch.zeros(0, 2, dtype=torch.long)
    assert reference.fused_code_ce(x, weight, codes, reduction="sum") == 0
    assert reference.fused_code_ce(x, weight, codes).isnan()
